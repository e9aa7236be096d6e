"""Exit 0 when this checkout is the installed sparsekern and its _C is newer than every native source."""

import glob
import os
import sys

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["SPARSEKERN_NO_EXT"] = "1"  # import the package without loading (or warning about) _C
try:
    import sparsekern
except ImportError:
    sys.exit(1)
if os.path.dirname(os.path.dirname(os.path.abspath(sparsekern.__file__))) != root:
    sys.exit(1)  # another copy is installed
built = glob.glob(os.path.join(root, "sparsekern", "_C*.so"))
if not built:
    sys.exit(1)
sources = glob.glob(os.path.join(root, "csrc", "**", "*.*"), recursive=True) + [os.path.join(root, "setup.py")]
sys.exit(0 if min(map(os.path.getmtime, built)) > max(map(os.path.getmtime, sources)) else 1)
