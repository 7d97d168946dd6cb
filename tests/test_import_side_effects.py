"""Importing diffst changes nothing global; the entry points that start work set OMP_WAIT_POLICY before torch loads.

Each check runs in a fresh interpreter (the test process has long imported torch and matplotlib).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest


def _run(code: str, env_overrides: dict[str, str] | None = None, cwd=None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "MPLBACKEND")}
    env.update(env_overrides or {})
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_diffst_changes_no_environment_and_no_matplotlib_backend(tmp_path):
    result = _run(f"""
        import json, os, sys

        env_before = dict(os.environ)
        import diffst

        bare = {{m: m in sys.modules for m in ("torch", "matplotlib")}}
        import matplotlib

        # The raw rcParams value: matplotlib.get_backend() would itself resolve (and so change) the backend.
        backend_before = dict.__getitem__(matplotlib.rcParams, "backend")
        import diffst.cli, diffst.io, diffst.plotting.compare, diffst.plotting.preview, diffst.testing, diffst.training
        from diffst.plotting.compare import plot_metric_vs_steps

        rows = [{{"method": "ddim", "steps": s, "pcc": 0.1 * s}} for s in (1, 2, 4)]
        png = plot_metric_vs_steps(rows, {str(tmp_path / "plot.png")!r}, reference={{"bicubic": 0.2}})
        print(json.dumps({{
            "bare": bare,
            "env_changed": sorted(k for k in set(env_before) | set(os.environ) if env_before.get(k) != os.environ.get(k)),
            "backend_same": dict.__getitem__(matplotlib.rcParams, "backend") is backend_before,
            "pyplot": "matplotlib.pyplot" in sys.modules,
            "png": png.stat().st_size,
            "version": diffst.__version__,
        }}))
    """)
    assert result["bare"] == {"torch": False, "matplotlib": False}, "import diffst must load no heavy dependency"
    assert result["env_changed"] == []
    assert result["backend_same"] and not result["pyplot"], "plotting must neither select a backend nor use pyplot"
    assert result["png"] > 10_000
    assert result["version"]


def test_version_is_the_installed_distribution_version():
    from importlib.metadata import version

    import diffst

    assert diffst.__version__ == version("diffst")


# Records OMP_WAIT_POLICY at the moment torch is first imported, then runs an entry point that fails fast on a
# missing config (after loading torch).
_AT_TORCH_IMPORT = """
    import json, os, sys

    seen = {{}}

    class Spy:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" and "torch" not in seen:
                seen["torch"] = os.environ.get("OMP_WAIT_POLICY")

    sys.meta_path.insert(0, Spy())
    try:
        {call}
    except SystemExit as exc:
        seen["exit"] = exc.code
    print(json.dumps(seen))
"""
_ENTRY_POINTS = {
    "python -m diffst.training": 'import runpy; sys.argv = ["diffst.training", "--config", "missing.yaml"]; '
                                 'runpy.run_module("diffst.training", run_name="__main__", alter_sys=True)',
    "diffst (console script)": 'from diffst.cli import main; sys.argv = ["diffst", "train", "--config", "missing.yaml"]; '
                               "main()",
}


@pytest.mark.parametrize("entry", sorted(_ENTRY_POINTS))
@pytest.mark.parametrize("user_value", [None, "ACTIVE"])
def test_entry_points_set_passive_openmp_wait_before_torch_loads(entry, user_value, tmp_path):
    code = _AT_TORCH_IMPORT.format(call=_ENTRY_POINTS[entry])
    seen = _run(code, {"OMP_WAIT_POLICY": user_value} if user_value else None, cwd=tmp_path)
    assert seen["exit"] == 2, seen  # the missing config, reported as a user error
    assert seen["torch"] == (user_value or "PASSIVE"), seen  # set before torch loaded; a user's value wins
