"""Where models and data come from: built-in demos and user factories."""

from hwprune.subjects.base import Subject
from hwprune.subjects.demo import DEMOS, build_demo
from hwprune.subjects.loader import load_subject

__all__ = ["DEMOS", "Subject", "build_demo", "load_subject"]
