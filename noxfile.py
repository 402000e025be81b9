"""Test sessions for multidrop: one per Keras backend, plus cross-backend, benchmarks and fuzzing.

    nox                          # tests on torch, jax and tensorflow, then crossbackend
    nox -s "tests(jax)" -- -k nested
    nox -s bench                 # quick benchmark (not in the default set)
    nox -s fuzz                  # long Hypothesis budget (not in the default set)
    nox -s sweep                 # all 40 keras.applications models (not in the default set)
"""

import nox

BACKENDS = ["torch", "jax", "tensorflow"]
CONSTRAINTS = ("-c", "constraints.txt")

nox.options.sessions = ["tests", "crossbackend"]
nox.options.error_on_missing_interpreters = True


def install(session: nox.Session, *extras: str) -> None:
    session.install(*CONSTRAINTS, "-e", f".[{','.join((*extras, 'test'))}]")


def pytest(session: nox.Session, backend: str | None, *args: str, **env: str) -> None:
    """Run pytest with ``args`` then the session's own arguments, on ``backend``."""
    env = {"TF_CPP_MIN_LOG_LEVEL": "3", **env, **({"KERAS_BACKEND": backend} if backend else {})}
    session.run("pytest", *args, *session.posargs, env=env)


@nox.session
@nox.parametrize("backend", BACKENDS, ids=BACKENDS)
def tests(session: nox.Session, backend: str) -> None:
    """Run the test suite on one Keras backend (all three are installed: some tests start
    subprocesses on another backend, e.g. JAX DataParallel or the PyTorch default)."""
    install(session, *BACKENDS)
    pytest(session, backend, "-m", "not crossbackend")


@nox.session
def crossbackend(session: nox.Session) -> None:
    """Install all three backends in one environment and run the cross-backend tests."""
    install(session, *BACKENDS)
    pytest(session, None, "-m", "crossbackend")


@nox.session(default=False)
@nox.parametrize("backend", BACKENDS, ids=BACKENDS)
def fuzz(session: nox.Session, backend: str) -> None:
    """Property tests on random graphs with the long Hypothesis budget (profile "fuzz")."""
    install(session, *BACKENDS)
    pytest(session, backend, "tests/test_fuzz.py", "--hypothesis-show-statistics", HYPOTHESIS_PROFILE="fuzz")


@nox.session(default=False)
@nox.parametrize("backend", BACKENDS, ids=BACKENDS)
def sweep(session: nox.Session, backend: str) -> None:
    """Rewire all 40 keras.applications models, not just one per family as CI does."""
    install(session, *BACKENDS)
    pytest(session, backend, "tests/test_sweep.py", "--durations=0", MULTIDROP_SWEEP="all")


@nox.session(default=False)
@nox.parametrize("backend", BACKENDS, ids=BACKENDS)
def bench(session: nox.Session, backend: str) -> None:
    """Quick training-overhead benchmark; options after -- replace --quick (-- --models mlp)."""
    install(session, backend)
    env = {"KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    session.run("python", "-m", "benchmarks", *(session.posargs or ["--quick"]), env=env)
