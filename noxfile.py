"""Test sessions for multidrop: one per Keras backend, plus cross-backend, benchmarks and fuzzing.

    nox                          # tests on torch, jax and tensorflow, then crossbackend
    nox -s "tests(jax)" -- -k nested
    nox -s bench                 # quick benchmark (not in the default set)
    nox -s fuzz                  # long Hypothesis budget (not in the default set)
"""

import nox

BACKENDS = ["torch", "jax", "tensorflow"]
CONSTRAINTS = ("-c", "constraints.txt")

nox.options.sessions = ["tests", "crossbackend"]
nox.options.error_on_missing_interpreters = True


def install(session: nox.Session, *extras: str) -> None:
    session.install(*CONSTRAINTS, "-e", f".[{','.join((*extras, 'test'))}]")


@nox.session
@nox.parametrize("backend", BACKENDS, ids=BACKENDS)
def tests(session: nox.Session, backend: str) -> None:
    """Run the test suite on one Keras backend (all three are installed: some tests start
    subprocesses on another backend, e.g. JAX DataParallel or the PyTorch default)."""
    install(session, *BACKENDS)
    session.run(
        "pytest", "-m", "not crossbackend", *session.posargs,
        env={"KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )


@nox.session
def crossbackend(session: nox.Session) -> None:
    """Install all three backends in one environment and run the cross-backend tests."""
    install(session, *BACKENDS)
    session.run("pytest", "-m", "crossbackend", *session.posargs, env={"TF_CPP_MIN_LOG_LEVEL": "3"})
