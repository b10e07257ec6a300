# Version checks shared by the env scripts (sourced, not run):
#   version_lt A B, require_python PYTHON MIN BELOW WHY.
# Each fails with one line on stderr before anything is created or downloaded.

# True when dotted version A sorts before B ("3.10" < "3.11", "470.82.01" < "525.60.13").
version_lt() { [ "$1" != "$2" ] && [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -1)" = "$1" ]; }

# Exit 1 unless MIN <= PYTHON's major.minor (< BELOW when BELOW is not empty); WHY says what needs it.
require_python() {
  local py=$1 min=$2 below=$3 why=$4 have
  local want="Python >= $min${below:+ and < $below}"
  if ! have=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null); then
    echo "error: $why needs $want, but '$py' does not run; point PYTHON at one (PYTHON=python3.11)" >&2
    exit 1
  fi
  if version_lt "$have" "$min" || { [ -n "$below" ] && ! version_lt "$have" "$below"; }; then
    echo "error: $why needs $want, but $py is Python $have; point PYTHON at another (PYTHON=python3.11)" >&2
    exit 1
  fi
}
