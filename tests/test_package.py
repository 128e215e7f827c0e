"""The Python package as a host installs it: a wheel, a core install without the server extra,
types a host's mypy --strict can check against, and a module graph without cycles.

The wheel is built once per session from a copy of the sources (setuptools leaves build/ and
*.egg-info behind, and a stale build/ would put deleted modules in the next wheel), then
installed with its core dependency only, pinned by constraints.txt, in a venv of its own.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest

import token_billing
from token_billing.server.http_errors import ApiError

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ROOT / "api"
PACKAGE = SOURCES / "token_billing"

# What the server extra (and the supabase one) add: none of it may be needed by the client.
SERVER_ONLY = (
    "starlette",
    "uvicorn",
    "h11",
    "stripe",
    "pydantic",
    "pydantic_settings",
    "supabase",
    "postgrest",
    "httpx",
    "jwt",
    "prometheus_client",
)
# The modules a host imports to use the client; they must import without the server extra.
CORE_MODULES = ("token_billing", "token_billing.client", "token_billing.db", "token_billing.errors")
# The packages of the service and the command, which the client never imports.
NOT_CORE = ("token_billing.server", "token_billing.cli")
# psycopg[binary,pool] and what it depends on (typing-extensions before Python 3.13).
CORE_DISTRIBUTIONS = {"token-billing", "psycopg", "psycopg-binary", "psycopg-pool"}
CORE_DISTRIBUTIONS_OPTIONAL = {"typing-extensions"}


def _in_package(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def _run(
    *args: str | Path, cwd: Path | None = None, drop: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    for name in drop:
        env.pop(name, None)
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, env=env, check=False, cwd=cwd
    )


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"{result.args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@dataclass(frozen=True)
class CoreInstall:
    wheel: Path
    python: Path
    bin: Path


@pytest.fixture(scope="session")
def core_install(tmp_path_factory: pytest.TempPathFactory) -> CoreInstall:
    """The wheel, and a venv holding it with the core dependency only (no extras)."""
    work = tmp_path_factory.mktemp("package")
    source = work / "source"
    source.mkdir()
    shutil.copy2(ROOT / "pyproject.toml", source / "pyproject.toml")
    for extra in ("README.md", "LICENSE", "CHANGELOG.md"):  # should pyproject name them
        if (ROOT / extra).exists():
            shutil.copy2(ROOT / extra, source / extra)
    shutil.copytree(
        SOURCES, source / "api", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    shutil.copytree(ROOT / "sql", source / "sql")
    dist = work / "dist"
    pip = (sys.executable, "-m", "pip")
    _ok(_run(*pip, "wheel", source, "--no-deps", "--no-build-isolation", "--quiet", "-w", dist))
    (wheel,) = dist.glob("token_billing-*.whl")

    venv = work / "venv"
    _ok(_run(sys.executable, "-m", "venv", "--without-pip", venv))
    python = venv / "bin" / "python"
    # The dev venv's pip installs into the new venv: nothing but the wheel and what it requires.
    _ok(_run(*pip, "--python", python, "install", "--quiet", "-c", ROOT / "constraints.txt", wheel))
    return CoreInstall(wheel=wheel, python=python, bin=venv / "bin")


# --- the wheel -----------------------------------------------------------------------------------


SQL_FILES = [p for p in (ROOT / "sql").rglob("*") if p.is_file()]


@pytest.mark.slow
def test_the_wheel_should_ship_the_package_with_py_typed_and_nothing_else(
    core_install: CoreInstall,
) -> None:
    names = zipfile.ZipFile(core_install.wheel).namelist()
    assert "token_billing/py.typed" in names, "mypy in a host needs the PEP 561 marker"
    shipped = {f"token_billing/sql/{p.relative_to(ROOT / 'sql').as_posix()}" for p in SQL_FILES}
    assert shipped <= set(names), f"SQL missing from the wheel: {sorted(shipped - set(names))}"
    sources = {p.relative_to(SOURCES).as_posix() for p in PACKAGE.rglob("*.py")}
    assert sources <= set(names), f"modules missing from the wheel: {sorted(sources - set(names))}"
    tops = {name.split("/")[0] for name in names}
    dist_info = f"token_billing-{token_billing.__version__}.dist-info"
    assert tops == {"token_billing", dist_info}, f"the wheel should hold only the package: {tops}"
    entry_points = zipfile.ZipFile(core_install.wheel).read(f"{dist_info}/entry_points.txt")
    assert "token-billing = token_billing.cli:main" in entry_points.decode()


@pytest.mark.slow
def test_a_core_install_should_hold_only_psycopg_beside_the_package(
    core_install: CoreInstall,
) -> None:
    names = (
        "import json, importlib.metadata as m; "
        "print(json.dumps([d.metadata['Name'] for d in m.distributions()]))"
    )
    listed = _ok(_run(core_install.python, "-c", names))
    installed = {name.lower().replace("_", "-") for name in json.loads(listed)}
    assert installed >= CORE_DISTRIBUTIONS
    assert installed <= CORE_DISTRIBUTIONS | CORE_DISTRIBUTIONS_OPTIONAL, (
        f"a core install should not pull in {sorted(installed - CORE_DISTRIBUTIONS)}"
    )


@pytest.mark.slow
def test_the_client_should_import_without_the_server_extra(core_install: CoreInstall) -> None:
    probe = textwrap.dedent(
        f"""
        import importlib.util, json, sys
        import token_billing, token_billing.client, token_billing.db, token_billing.errors
        from token_billing import TokenBilling, TokenBillingError
        from token_billing.db import PostgresDatabase, SupabaseDatabase
        server_only = {SERVER_ONLY!r}
        print(json.dumps({{
            "version": token_billing.__version__,
            "loaded": sorted(m for m in server_only if m in sys.modules),
            "installed": sorted(m for m in server_only if importlib.util.find_spec(m)),
            "file": token_billing.__file__,
        }}))
        """
    )
    report = json.loads(_ok(_run(core_install.python, "-c", probe, cwd=core_install.bin)))
    assert report["version"] == token_billing.__version__
    assert report["loaded"] == [], "importing the client should load nothing of the server"
    assert report["installed"] == [], "the core install should have no server dependency"
    assert "site-packages" in report["file"], "the installed wheel, not the sources, was tested"


@pytest.mark.slow
def test_install_and_doctor_should_work_from_a_core_install(core_install: CoreInstall) -> None:
    """The commands that install the SQL need only psycopg, and the wheel carries the SQL."""
    command = core_install.bin / "token-billing"
    printed = _ok(_run(command, "install", "--print", "--signup-grant", "0", cwd=core_install.bin))
    installer = (ROOT / "sql" / "token_billing.sql").read_text(encoding="utf-8")
    assert printed.endswith(installer)
    assert "select pg_catalog.set_config('token_billing.signup_grant', '0', true);" in printed
    removal = _ok(_run(command, "uninstall", "--print", cwd=core_install.bin))
    assert removal.endswith((ROOT / "sql" / "token_billing_uninstall.sql").read_text())
    result = _run(command, "doctor", cwd=core_install.bin, drop=("DATABASE_URL",))
    assert result.returncode == 2
    assert result.stderr == "token-billing doctor: give --db-url or set DATABASE_URL\n"


@pytest.mark.slow
def test_server_commands_without_the_extra_should_say_what_to_install(
    core_install: CoreInstall,
) -> None:
    command = core_install.bin / "token-billing"
    _ok(_run(command, "--help", cwd=core_install.bin))
    for args in (["serve"], ["stripe", "sync-products"]):
        result = _run(command, *args, cwd=core_install.bin)
        assert result.returncode == 2, result
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, f"one line, no traceback: {result.stderr}"
        assert "pip install 'token-billing[server]'" in lines[0]
        assert lines[0].startswith(f"token-billing {' '.join(args)}: needs the server extra")


# --- types, as a host's mypy --strict sees them ----------------------------------------------

HOST_MODULE = '''
"""An agent backend's use of the client, as the README shows it."""

from __future__ import annotations

import uuid
from datetime import timedelta

from token_billing import InsufficientTokens, Reservation, Result, TokenBilling, TokenBillingError
from token_billing.db import Database, PostgresDatabase


async def answer(database_url: str, user_id: uuid.UUID, request_id: str) -> int | None:
    db: Database = PostgresDatabase(database_url, max_size=4)
    await db.open()
    tokens = TokenBilling(db)
    try:
        hold: Reservation
        async with tokens.reserve(user_id, 500, key=request_id, ttl=timedelta(minutes=5)) as hold:
            settled: Result = await hold.settle(120)
        charged = await tokens.deduct(user_id, 10, key=f"{request_id}:tool", metadata={"n": 1})
        many = await tokens.settle_many({uuid.uuid4(): 3})
        balance = await tokens.balance(user_id)
        print(settled.status, balance["available"], len(many))
        return charged.balance
    except InsufficientTokens as exc:
        available: int | None = exc.available
        return available if available is not None else exc.requested
    except TokenBillingError:
        return None
    finally:
        await db.close()
'''

# Wrong on purpose: the package's types must reach the host (not Any), so these must fail.
MISUSE_MODULE = """
from __future__ import annotations

from token_billing import TokenBilling
from token_billing.db import PostgresDatabase


async def misuse() -> None:
    tokens = TokenBilling(PostgresDatabase("postgresql://"))
    await tokens.deduct("user", "ten", key="k")
    await tokens.deduct("user", 10)
"""


@pytest.mark.slow
@pytest.mark.parametrize("install", ["wheel", "editable"])
def test_mypy_strict_should_pass_on_a_host_module_using_the_client(
    install: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Against the wheel in the core venv, and the dev venv's editable install."""
    python = (
        request.getfixturevalue("core_install").python if install == "wheel" else sys.executable
    )
    (tmp_path / "host.py").write_text(HOST_MODULE)
    (tmp_path / "misuse.py").write_text(MISUSE_MODULE)
    result = _run(
        *(sys.executable, "-m", "mypy", "--strict", "--python-executable", python),
        *("--cache-dir", tmp_path / ".mypy_cache", "--no-error-summary", "host.py", "misuse.py"),
        cwd=tmp_path,
    )
    lines = result.stdout.splitlines()
    host = [line for line in lines if not line.startswith("misuse.py:")]
    misuse = [line for line in lines if line.startswith("misuse.py:")]
    assert host == [], "the host module should type-check: " + "\n".join(lines) + result.stderr
    assert any("[arg-type]" in line for line in misuse), f"a str amount should be refused: {lines}"
    assert any('Missing named argument "key"' in line for line in misuse), lines


# --- the module graph ------------------------------------------------------------------------


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCES).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str, *, at_import_time: bool) -> set[str]:
    """The modules `module` imports: all of them, or only those its import itself runs (not in
    functions, not under `if TYPE_CHECKING`)."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if at_import_time and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            return
        if at_import_time and isinstance(node, ast.If) and _is_type_checking(node.test):
            for statement in node.orelse:
                visit(statement)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from a import b` imports the module a.b when there is one, else a name of a.
            found.update(
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                for alias in node.names
            )
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def test_the_module_graph_should_have_no_cycles() -> None:
    """Imports inside functions count too: a lazy import is how a cycle used to be hidden."""
    graph = {m: {t for t in _imports(m, at_import_time=False) if t in MODULES} for m in MODULES}
    cycles: list[list[str]] = []
    state: dict[str, str] = {}

    def walk(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                walk(target, [*path, target])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_routes_should_never_import_the_app() -> None:
    routes = [m for m in MODULES if m.startswith("token_billing.server.routes.")]
    assert len(routes) >= 7, routes
    offenders = [
        m for m in routes if "token_billing.server.app" in _imports(m, at_import_time=False)
    ]
    assert not offenders, f"routes import token_billing.server.deps, never the app: {offenders}"


@pytest.mark.parametrize("module", CORE_MODULES)
def test_the_client_modules_should_not_import_the_server_extra(module: str) -> None:
    at_import = _imports(module, at_import_time=True)
    server = sorted(name for name in at_import if name.split(".")[0] in SERVER_ONLY)
    assert not server, f"{module} imports {server} when it is imported (do it lazily)"
    anywhere = _imports(module, at_import_time=False)
    ours = sorted(name for name in anywhere if _in_package(name, *NOT_CORE))
    assert not ours, f"{module} reaches into {ours}: the client must not depend on the server"


def test_the_client_modules_should_load_nothing_of_the_server_when_imported() -> None:
    """The same in a real interpreter (the dev venv, where the server extra is installed)."""
    probe = (
        "import json, sys\n"
        f"import {', '.join(CORE_MODULES)}\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {SERVER_ONLY!r}"
        f" or m in {NOT_CORE!r} or m.startswith({tuple(p + '.' for p in NOT_CORE)!r}))))"
    )
    loaded = json.loads(_ok(_run(sys.executable, "-c", probe, cwd=SOURCES)))
    assert loaded == [], f"importing the client loaded {loaded}"


# --- the public names ------------------------------------------------------------------------


def test_every_error_should_share_one_base_class() -> None:
    errors = [
        value
        for name in token_billing.__all__
        if isinstance(value := getattr(token_billing, name), type)
        and issubclass(value, BaseException)
    ]
    assert len(errors) >= 6, errors
    assert all(issubclass(e, token_billing.TokenBillingError) for e in [*errors, ApiError])


def test_the_version_should_be_the_distribution_version() -> None:
    assert metadata.version("token-billing") == token_billing.__version__
