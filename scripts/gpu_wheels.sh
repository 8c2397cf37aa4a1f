#!/usr/bin/env bash
# Wheels that a GPU machine without internet access lacks, into .whl/ at the repo root.
#
#     bash scripts/gpu_wheels.sh          # here, where pip can reach PyPI; then carry .whl/ along
#
# The GPU image (Python 3.12, x86-64) has torch, lightning, torchmetrics, transformers, pandas,
# scipy, tabulate, pytest and matplotlib, but not the packages below; scripts/gpu_check.sh
# installs .whl/*.whl with --no-deps, so every requirement the image lacks is named here too
# (worked out from each package's Requires-Dist against the image's package list, 2026-11-17).
# Versions are pinned to this checkout's virtualenv (PYTHON, default .venv/bin/python), so the
# GPU machine runs the versions the test suite ran here.
#
# .whl/ must be ignored by git (.gitignore has /.whl/): it travels beside the working tree, whose
# whole size must stay under 64 MiB. The script prints the folder's size at the end.
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=.whl
NAMES=(
    hydra-core omegaconf antlr4-python3-runtime diffusers importlib-metadata prdc
    wandb pydantic pydantic-core annotated-types typing-inspection platformdirs
    opentelemetry-api opentelemetry-sdk opentelemetry-semantic-conventions opentelemetry-proto
    opentelemetry-exporter-otlp-proto-http opentelemetry-exporter-otlp-proto-common
    opentelemetry-exporter-otlp-common opentelemetry-exporter-http-transport
    googleapis-common-protos cwevals sniffio distro lazy-importer
)
# the GPU image's interpreter: binary wheels must be cp312 manylinux x86-64
PLATFORM_ARGS=(
    --python-version 3.12 --implementation cp
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64
)

installed_version() {
    "$PY" -m pip show "$1" 2>/dev/null | awk '/^Version:/ {print $2}'
}

# wheel file names spell a project with underscores, in any case
wheel_prefix() {
    echo "$1" | tr 'A-Z-.' 'a-z__'
}

fetch() {
    local name=$1 version=$2 prefix
    prefix=$(wheel_prefix "$name")
    if compgen -G "$DEST/${prefix}-${version}-*.whl" >/dev/null; then
        return 0
    fi
    # one version of each: two wheels of one project stop the install on the GPU machine
    find "$DEST" -maxdepth 1 -iname "${prefix}-*.whl" -delete
    if ! "$PY" -m pip download -q --no-deps --only-binary=:all: "${PLATFORM_ARGS[@]}" -d "$DEST" "$name==$version"; then
        # some pure-python projects publish only an sdist (antlr4-python3-runtime 4.9.3): build it here
        echo "no wheel of $name==$version on the index: building one" >&2
        "$PY" -m pip wheel -q --no-deps -w "$DEST" "$name==$version"
    fi
    if compgen -G "$DEST/${prefix}-${version}-*.whl" >/dev/null; then
        local built=("$DEST/${prefix}-${version}"-*.whl)
        case "${built[0]}" in
            *-none-any.whl | *cp312*manylinux*x86_64*.whl | *py3-none-manylinux*x86_64*.whl | *abi3-manylinux*x86_64*.whl) ;;
            *) echo "error: ${built[0]} does not run on cp312 x86-64" >&2 && return 1 ;;
        esac
    else
        echo "error: no wheel of $name==$version in $DEST" >&2
        return 1
    fi
}

main() {
    mkdir -p "$DEST"
    local name version failed=0
    for name in "${NAMES[@]}"; do
        version=$(installed_version "$name")
        if [[ -z $version ]]; then
            echo "error: $name is not installed in $PY's environment" >&2
            failed=1
            continue
        fi
        fetch "$name" "$version" || failed=1
    done
    if ! git check-ignore -q "$DEST/x.whl"; then
        echo "warning: $DEST/ is not ignored by git: add /.whl/ to .gitignore or .git/info/exclude" >&2
    fi
    ls -1 "$DEST"
    echo "$(find "$DEST" -maxdepth 1 -type f -name '*.whl' | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST/"
    return "$failed"
}

main "$@"
