#!/usr/bin/env bash
# An emulated Raspberry Pi for the tests: Debian bookworm's arm64 python3.11, run by qemu-aarch64, with the AArch64
# wheels of apache-tvm and what TVM's rpc_server needs. Built once under a cache folder:
#   ${HWPRUNE_CACHE:-~/.cache/hwprune}/aarch64-emulator/
#     sysroot/        arm64 .debs unpacked with dpkg-deb -x (libc, libstdc++, python3.11 and the libraries it loads)
#     site-packages/  pip install --target ... --platform manylinux_*_aarch64 (the pins below)
#     python3         the wrapper: exec qemu-aarch64 -L sysroot sysroot/usr/bin/python3.11 "$@"
#     stamp           the pins of a complete build; a matching stamp means nothing is done again
#
#   bash scripts/setup-aarch64-emulator.sh     the wrapper's path on the last stdout line (for HWPRUNE_AARCH64_PYTHON)
#
# Without root, apt-get, qemu-aarch64 (Debian: qemu-user) or network it prints one line on stderr, nothing on stdout,
# and exits 0: the emulated-board test is then skipped. Downloads about 130 MB (the apache-tvm wheel is 95 MB); the
# Debian packages come through a private apt state folder, so the system's dpkg architectures and lists are untouched.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
DEST=${HWPRUNE_CACHE:-$HOME/.cache/hwprune}/aarch64-emulator

# Same versions as the host (pyproject.toml's tvm extra and .venv): the library format is versioned, and
# apache-tvm-ffi 0.1.15.x segfaults in MetaSchedule.
WHEELS=(apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1 numpy==2.4.6 ml_dtypes==0.6.0 typing_extensions==4.16.0
        tornado==6.6.1 cloudpickle==3.1.2 psutil==7.2.2)
SUITE=bookworm  # its python3.11 matches the cp311 wheels
DEBS=(libc6 libgcc-s1 libstdc++6 zlib1g libexpat1 libffi8 libssl3 libbz2-1.0 liblzma5 libsqlite3-0 libncursesw6
      libtinfo6 libuuid1 libreadline8 libpython3.11-minimal libpython3.11-stdlib python3.11-minimal)
MIRROR=${HWPRUNE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${HWPRUNE_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
STAMP="aarch64-emulator 1
debian $SUITE arm64: ${DEBS[*]}
wheels cp311 manylinux aarch64: ${WHEELS[*]}"

skip() {
  echo "setup-aarch64-emulator: $*; the emulated Raspberry Pi test (HWPRUNE_AARCH64_PYTHON) will be skipped" >&2
  exit 0
}
fail() {  # a build that stopped half way: keep only its log
  rm -rf "$DEST/apt" "$DEST/debs" "$DEST/sysroot" "$DEST/site-packages" "$DEST/python3"
  skip "$@"
}

QEMU=$(command -v qemu-aarch64 || true)
[ -n "$QEMU" ] || skip "qemu-aarch64 not found (Debian/Ubuntu: apt-get install qemu-user)"
if [ -x "$DEST/python3" ] && [ "$(cat "$DEST/stamp" 2>/dev/null)" = "$STAMP" ]; then
  echo "$DEST/python3"
  exit 0
fi
[ "$(id -u)" = 0 ] || skip "not root (the first build downloads Debian arm64 packages with apt-get)"
command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || skip "no apt-get/dpkg-deb"
[ -r "$KEYRING" ] || skip "no Debian archive keyring at $KEYRING (apt-get install debian-archive-keyring)"
PY=$REPO/.venv/bin/python
[ -x "$PY" ] || PY=$(command -v python3 || true)
[ -n "$PY" ] && "$PY" -m pip --version >/dev/null 2>&1 || skip "no python with pip (run scripts/setup.sh first)"

mkdir -p "$(dirname "$DEST")"
exec 9>"$DEST.lock"  # one build at a time; a second run waits, then finds the stamp
flock 9
if [ -x "$DEST/python3" ] && [ "$(cat "$DEST/stamp" 2>/dev/null)" = "$STAMP" ]; then
  echo "$DEST/python3"
  exit 0
fi

rm -rf "$DEST"
mkdir -p "$DEST/apt/lists/partial" "$DEST/apt/cache/archives/partial" "$DEST/debs" "$DEST/sysroot"
LOG=$DEST/setup.log

# apt with its own sources, lists and status: arm64 as the only architecture, nothing of the host's state changed
: > "$DEST/apt/status"
for s in "$MIRROR $SUITE" "$MIRROR $SUITE-updates" "$SECURITY_MIRROR $SUITE-security"; do
  echo "deb [arch=arm64 signed-by=$KEYRING] ${s% *} ${s#* } main"
done > "$DEST/apt/sources.list"
APT=(-q -o APT::Architecture=arm64 -o APT::Architectures=arm64 -o Dir::Etc::SourceList="$DEST/apt/sources.list"
     -o Dir::Etc::SourceParts=/nonexistent -o Dir::State::Lists="$DEST/apt/lists"
     -o Dir::State::status="$DEST/apt/status" -o Dir::Cache="$DEST/apt/cache" -o Acquire::Languages=none
     -o APT::Sandbox::User=root)
apt-get "${APT[@]}" update >>"$LOG" 2>&1 || true  # an unreachable mirror is only a warning for apt-get update
compgen -G "$DEST/apt/lists/*_dists_${SUITE}_main_binary-arm64_Packages*" >/dev/null \
  || fail "apt-get update could not fetch Debian $SUITE arm64 from $MIRROR (no network?); see $LOG"
echo "setup-aarch64-emulator: building the AArch64 python under $DEST (one time; log: $LOG)" >&2
(cd "$DEST/debs" && apt-get "${APT[@]}" download "${DEBS[@]}") >>"$LOG" 2>&1 \
  || fail "apt-get download of the arm64 packages failed; see $LOG"
for deb in "$DEST"/debs/*.deb; do
  dpkg-deb -x "$deb" "$DEST/sysroot" || fail "dpkg-deb -x $deb failed; see $LOG"
  basename "$deb" >> "$DEST/manifest.txt"
done

platforms=()
for v in 17 24 26 27 28 31 34 35 36; do platforms+=(--platform "manylinux_2_${v}_aarch64"); done  # glibc <= 2.36
PIP_DISABLE_PIP_VERSION_CHECK=1 "$PY" -m pip install -q --no-cache-dir --target "$DEST/site-packages" \
  --only-binary=:all: --implementation cp --python-version 3.11 --platform manylinux2014_aarch64 "${platforms[@]}" \
  "${WHEELS[@]}" >>"$LOG" 2>&1 || fail "pip could not fetch the AArch64 wheels (no network?); see $LOG"
printf '%s\n' "${WHEELS[@]}" >> "$DEST/manifest.txt"
rm -rf "$DEST/apt" "$DEST/debs"

# The wrapper. -0 makes sys.executable the wrapper itself: TVM's rpc_server starts its worker with sys.executable,
# and an AArch64 binary cannot be exec'd directly here (no binfmt_misc). PYTHONHOME keeps the standard library in
# the sysroot (the host's /usr/lib/python3.11 must never be read), PYTHONNOUSERSITE keeps ~/.local out.
{
  echo '#!/usr/bin/env bash'
  echo "# AArch64 python3.11 (Debian $SUITE arm64) under qemu-aarch64, written by scripts/setup-aarch64-emulator.sh"
  echo "D=$(printf %q "$DEST")"
  echo 'export PYTHONHOME=$D/sysroot/usr PYTHONPATH=$D/site-packages PYTHONNOUSERSITE=1'
  echo 'unset PYTHONSTARTUP PYTHONEXECUTABLE'
  echo "exec $(printf %q "$QEMU")"' -L "$D/sysroot" -0 "$D/python3" "$D/sysroot/usr/bin/python3.11" "$@"'
} > "$DEST/python3"
chmod +x "$DEST/python3"

# Check what the rpc_server needs, including starting a child through sys.executable, before stamping the build.
check='import subprocess, sys, platform, numpy, tornado, cloudpickle, psutil, tvm, tvm.rpc, tvm.relax
assert platform.machine() == "aarch64", platform.machine()
subprocess.run([sys.executable, "-c", "import platform; assert platform.machine() == \"aarch64\""], check=True)
print("aarch64 python", platform.python_version(), "tvm", tvm.__version__, "numpy", numpy.__version__)'
timeout 900 "$DEST/python3" -c "$check" >>"$LOG" 2>&1 \
  || fail "the AArch64 python does not import tvm under qemu-aarch64; see $LOG"
echo "$STAMP" > "$DEST/stamp"
echo "setup-aarch64-emulator: ready ($(du -sh "$DEST" | cut -f1)): $(tail -n 1 "$LOG")" >&2
echo "$DEST/python3"
