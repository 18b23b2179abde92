import sys
from pathlib import Path

# The benches compare against the plain-Python references kept with the tests.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
