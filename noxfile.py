"""Test sessions for multidrop: one per Keras backend, plus cross-backend, benchmarks and fuzzing.

nox                          # tests on torch, jax and tensorflow, crossbackend, docs, lint
nox -s "tests(jax)" -- -k nested
nox -s bench                 # quick benchmark (not in the default set)
nox -s fuzz                  # long Hypothesis budget (not in the default set)
nox -s sweep                 # all 40 keras.applications models (not in the default set)
nox -s "tests(keras-next)"   # the torch tests on keras-nightly (not in the default set)
nox -s "newest(torch)"       # one backend's tests on the newest releases, unpinned (not default)
nox -s docs                  # build the documentation into build/site (mkdocs --strict)
nox -s lint                  # ruff check and ruff format --check
"""

import pathlib
import sys

import nox

BACKENDS = ["torch", "jax", "tensorflow"]
# Every test session needs all three backends (cross-backend checks, JAX DataParallel, the
# PyTorch default, keras-hub's TensorFlow dependency), so they share one environment: it is
# installed once instead of four times, which halves CI's time on a 2-core machine.
SHARED = pathlib.Path(".nox", "shared")
BIN = SHARED / "bin"

nox.options.sessions = ["tests", "crossbackend", "docs", "lint"]
LINTED = ["multidrop", "tests", "benchmarks", "noxfile.py", "docs"]
nox.options.error_on_missing_interpreters = True


@nox.session(venv_backend="none")
def env(session: nox.Session) -> None:
    """Create or update the environment the test sessions share (.nox/shared)."""
    if not (BIN / "python").exists():
        session.run(sys.executable, "-m", "venv", str(SHARED))
    session.run(
        str(BIN / "python"),
        "-m",
        "pip",
        "install",
        "-q",
        "-c",
        "constraints.txt",
        "-e",
        ".[torch,jax,tensorflow,test]",
        external=True,
    )


def pytest(session: nox.Session, backend: str | None, *args: str, **env: str) -> None:
    """Run pytest in the shared environment with ``args`` then the session's own arguments."""
    env = {"TF_CPP_MIN_LOG_LEVEL": "3", **env, **({"KERAS_BACKEND": backend} if backend else {})}
    session.run(str(BIN / "pytest"), *args, *session.posargs, env=env, external=True)


@nox.session(venv_backend="none", requires=["env"])
@nox.parametrize("backend", BACKENDS, ids=BACKENDS)
def tests(session: nox.Session, backend: str) -> None:
    """Run the test suite on one Keras backend."""
    pytest(session, backend, "-m", "not crossbackend")


@nox.session(venv_backend="none", requires=["env"])
def crossbackend(session: nox.Session) -> None:
    """Run the cross-backend tests: one subprocess per backend, all three installed together."""
    pytest(session, None, "-m", "crossbackend")


@nox.session(name="tests(keras-next)", default=False)
def keras_next(session: nox.Session) -> None:
    """Run the torch tests on Keras' next release: keras-nightly and keras-hub-nightly."""
    pins = pathlib.Path("constraints.txt").read_text().splitlines()
    released = ("keras==", "keras-hub==")
    constraints = pathlib.Path(session.create_tmp(), "constraints.txt")
    constraints.write_text("\n".join(p for p in pins if not p.startswith(released)) + "\n")
    session.install("-c", str(constraints), "-e", ".[torch,jax,tensorflow,test]")
    # The nightlies ship the same modules as the releases the line above pulled in.
    session.run("python", "-m", "pip", "uninstall", "-q", "-y", "keras", "keras-hub")
    session.install("--pre", "--no-deps", "keras-nightly", "keras-hub-nightly")
    versions = "import keras, keras_hub; print('keras', keras.__version__, keras_hub.__version__)"
    session.run("python", "-c", versions, env={"KERAS_BACKEND": "torch"})
    env = {"KERAS_BACKEND": "torch", "TF_CPP_MIN_LOG_LEVEL": "3"}
    session.run("pytest", "-m", "not crossbackend", *session.posargs, env=env)


@nox.session(venv_backend="none", requires=["env"])
def docs(session: nox.Session) -> None:
    """Build the documentation into build/site with mkdocs --strict (API pages from docstrings)."""
    install(session, ".[docs,torch]")
    env = {"KERAS_BACKEND": "torch", "TF_CPP_MIN_LOG_LEVEL": "3", "NO_MKDOCS_2_WARNING": "1"}
    mkdocs = str(BIN / "mkdocs")
    session.run(mkdocs, "build", "--strict", *session.posargs, env=env, external=True)


@nox.session(venv_backend="none", requires=["env"])
def lint(session: nox.Session) -> None:
    """Lint with ruff and check that the code is formatted (``ruff format --check``)."""
    install(session, ".[lint]")
    session.run(str(BIN / "ruff"), "check", *LINTED, *session.posargs, external=True)
    session.run(str(BIN / "ruff"), "format", "--check", *LINTED, external=True)


@nox.session(default=False)
@nox.parametrize("backend", BACKENDS, ids=BACKENDS)
def newest(session: nox.Session, backend: str) -> None:
    """Run one backend's tests on the newest releases pip gives without constraints.txt
    (torch, jax, tensorflow, keras, keras-hub): what a user installing today would get."""
    session.install("--upgrade", "-e", ".[torch,jax,tensorflow,test]")
    versions = (
        "import importlib.metadata as m; print(*(f'{p} {m.version(p)}' for p in "
        "('torch', 'jax', 'tensorflow', 'keras', 'keras-hub', 'optuna')), sep=', ')"
    )
    session.run("python", "-c", versions)
    env = {"KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    session.run("pytest", "-m", "not crossbackend", *session.posargs, env=env)


def install(session: nox.Session, requirement: str) -> None:
    """Install ``requirement`` (an extra of multidrop) into the shared environment."""
    pip = [str(BIN / "python"), "-m", "pip", "install", "-q", "-c", "constraints.txt"]
    session.run(*pip, "-e", requirement, external=True)


@nox.session(venv_backend="none", requires=["env"], default=False)
@nox.parametrize("backend", BACKENDS, ids=BACKENDS)
def fuzz(session: nox.Session, backend: str) -> None:
    """Property tests on random graphs with the long Hypothesis budget (profile "fuzz")."""
    pytest(
        session,
        backend,
        "tests/test_fuzz.py",
        "--hypothesis-show-statistics",
        HYPOTHESIS_PROFILE="fuzz",
    )


@nox.session(venv_backend="none", requires=["env"], default=False)
@nox.parametrize("backend", BACKENDS, ids=BACKENDS)
def sweep(session: nox.Session, backend: str) -> None:
    """Rewire all 40 keras.applications models, not just one per family as CI does."""
    pytest(session, backend, "tests/test_sweep.py", "--durations=0", MULTIDROP_SWEEP="all")


@nox.session(default=False)
@nox.parametrize("backend", BACKENDS, ids=BACKENDS)
def bench(session: nox.Session, backend: str) -> None:
    """Quick training-overhead benchmark; options after -- replace --quick (-- --models mlp)."""
    session.install("-c", "constraints.txt", "-e", f".[{backend},test]")
    env = {"KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    session.run("python", "-m", "benchmarks", *(session.posargs or ["--quick"]), env=env)
