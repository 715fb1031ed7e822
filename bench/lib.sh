# Shared by the benchmark scripts (source it; the caller defines die).

# find_tool VAR name [candidate paths...]: VAR keeps a value the caller set
# (it must be executable), else gets `name` from PATH or the first
# executable candidate; otherwise the script dies.
find_tool() {
    local var=$1 name=$2 c
    shift 2
    if [[ -n ${!var:-} ]]; then
        [[ -x ${!var} ]] || die "$var=${!var} is not executable"
        return
    fi
    if c=$(command -v "$name" 2>/dev/null); then
        printf -v "$var" '%s' "$c"
        return
    fi
    for c in "$@"; do
        if [[ -x $c ]]; then
            printf -v "$var" '%s' "$c"
            return
        fi
    done
    die "$name not found; run: bash bench/install.sh"
}
