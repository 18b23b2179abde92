"""`pip download` for another interpreter: the one of a container image, which cannot reach an index.

pip's --python-version picks wheels for the target, but environment markers are still evaluated
against the Python running pip (so `async-timeout; python_full_version < "3.11.3"` is dropped
for Debian bookworm's 3.11.2 when the host runs 3.11.7). This runs pip with the markers' values
read from the target (`marker-env.json`, printed there by `--print-env`).

    python3 pip-download-for.py --print-env                  # in the target: its marker values
    python pip-download-for.py marker-env.json ARGS...       # on the host: pip download ARGS
"""

from __future__ import annotations

import json
import os
import platform
import sys


def _version(info) -> str:
    text = f"{info.major}.{info.minor}.{info.micro}"
    return text if info.releaselevel == "final" else f"{text}{info.releaselevel[0]}{info.serial}"


def marker_environment() -> dict[str, str]:
    """PEP 508's environment markers of this interpreter (what packaging's default_environment says)."""
    return {
        "implementation_name": sys.implementation.name,
        "implementation_version": _version(sys.implementation.version),
        "os_name": os.name,
        "platform_machine": platform.machine(),
        "platform_release": platform.release(),
        "platform_system": platform.system(),
        "platform_version": platform.version(),
        "python_full_version": platform.python_version(),
        "platform_python_implementation": platform.python_implementation(),
        "python_version": ".".join(platform.python_version_tuple()[:2]),
        "sys_platform": sys.platform,
    }


def main(argv: list[str]) -> int:
    if argv == ["--print-env"]:
        print(json.dumps(marker_environment()))
        return 0
    with open(argv[0]) as f:
        target = json.load(f)
    from pip._internal.cli.main import main as pip_main
    from pip._vendor.packaging import markers

    host = markers.default_environment
    markers.default_environment = lambda: {**host(), **target}
    return pip_main(["download", "--python-version", target["python_full_version"], *argv[1:]])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
