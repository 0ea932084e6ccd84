import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# tools/ holds the float64 NumPy statement of the step and the shared kernel-test inputs (tools/lstm_step_numpy.py),
# shared with tools/gpu_check.py on the machine without TensorFlow: tests `import lstm_step_numpy`.
TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
if TOOLS not in sys.path:
    sys.path.append(TOOLS)
