import os
import socket
import sys

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# tools/ holds the float64 NumPy statement of the step and the shared kernel-test inputs (tools/lstm_step_numpy.py),
# shared with tools/gpu_check.py on the machine without TensorFlow: tests `import lstm_step_numpy`.
TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
if TOOLS not in sys.path:
    sys.path.append(TOOLS)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails at once (and is recorded): the tests never touch the network."""
    attempts = []

    def refuse(address, timeout=None, *args, **kwargs):
        attempts.append((address, timeout))
        raise socket.timeout(f"no network in tests ({address})")

    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts
