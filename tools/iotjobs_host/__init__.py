"""Host-side tools of the project: jobsd, devsim, build, pki and the process helpers they share."""
import os

TOOLS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(TOOLS)
VENV_BIN = os.path.join(ROOT, ".venv", "bin")
BUILD = os.path.join(ROOT, "build")
