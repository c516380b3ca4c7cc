"""What a new user meets on a fresh machine: silent imports, the PSIS backend their Python
gets, and the warning policy of the suite (pyproject's filterwarnings)."""

import os
import subprocess
import sys
import warnings

import pytest

from vi_lab.gaps import psis_backend


def test_importing_vi_lab_on_a_fresh_home_prints_nothing(tmp_path):
    # a new HOME and cache dir: ArviZ 0.x prints its banner on the first import of the day there
    home, cache = tmp_path / "home", tmp_path / "cache"
    home.mkdir(), cache.mkdir()
    code = "import vi_lab, vi_lab.gaps, vi_lab.viz, vi_lab.em, vi_lab.wake_sleep; vi_lab.gaps.psis_backend()"
    env = {"HOME": str(home), "XDG_CACHE_HOME": str(cache), "PATH": "/usr/bin:/bin"}
    if "PYTHONPATH" in os.environ:  # packages installed beside the interpreter's (a lent GPU machine)
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    done = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""


def test_each_python_gets_the_psis_backend_pyproject_declares():
    # pyproject: arviz-stats >= 1 (ArviZ 1.x) from Python 3.12 on, ArviZ 0.x before;
    # CI runs 3.11 and 3.12, so both implementations are exercised
    name, khat_of = psis_backend()
    expected = "arviz_stats" if sys.version_info >= (3, 12) else "arviz"
    assert name.split()[0] == expected, name
    assert callable(khat_of)


def _warn(category, module):
    warnings.warn_explicit("a test warning", category, filename=module.replace(".", "/") + ".py", lineno=1,
                           module=module)


@pytest.mark.parametrize("category", [DeprecationWarning, FutureWarning, PendingDeprecationWarning])
@pytest.mark.parametrize("module", ["torch.serialization", "pyro.infer.svi", "arviz", "xarray.core"])
def test_a_dependency_deprecating_its_own_internals_does_not_fail_tests(category, module):
    _warn(category, module)  # ignored by pyproject's filterwarnings: nothing is raised


@pytest.mark.parametrize("category, module", [
    (DeprecationWarning, "vi_lab.infer"),  # vi_lab's own
    (FutureWarning, "tests.test_install"),  # a test's call into a deprecated API (caller's stack level)
    (UserWarning, "pyro.infer.trace_elbo"),  # a dependency warning about how it is used
    (RuntimeWarning, "torch.nn.modules.module"),
])
def test_vi_labs_warnings_and_warnings_about_its_calls_still_fail(category, module):
    with pytest.raises(category):
        _warn(category, module)
