# Sourced by the scripts that install Debian packages when missing.
# apt_install WHO PACKAGE...: installs as root, or through sudo when not root.
# Sets SUDO ("" or "sudo") for what the caller runs after it.

apt_install() {
    local who=$1
    shift
    SUDO=""
    if [[ "$(id -u)" != 0 ]]; then
        command -v sudo >/dev/null || { echo "$who: need root to install $*" >&2; exit 1; }
        SUDO=sudo
    fi
    echo "$who: apt-get install $*"
    export DEBIAN_FRONTEND=noninteractive
    if [[ -n ${APT_PRESEED:-} ]]; then
        echo "$APT_PRESEED" | $SUDO debconf-set-selections
    fi
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=600 "$@"
}
