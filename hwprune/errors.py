"""Errors that hwprune reports to users as one clear line (the CLI prints them without a traceback)."""

from __future__ import annotations


class HwpruneError(Exception):
    """A problem the user can fix; its message says what is wrong and what to do."""


class ProfileError(HwpruneError):
    """A device profile is unknown or malformed."""


class SubjectError(HwpruneError):
    """A model source (built-in name or ``package.module:factory``) cannot be loaded or is malformed."""


class ExportError(HwpruneError):
    """A model cannot be traced or exported to ONNX."""


class BackendUnavailable(HwpruneError):
    """A measurement backend cannot run here or cannot reach its device."""


class MeasurementError(HwpruneError):
    """A measurement started but failed (board vanished, session died, compile failed)."""


class BudgetUnreachable(HwpruneError):
    """No candidate met the budgets; the message says the best latency and memory reached."""
