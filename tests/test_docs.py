"""README.md is assembled from docs/*.md; the two must not drift apart."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_is_built_from_docs():
  proc = subprocess.run([sys.executable, os.path.join(REPO, 'docs', 'build_readme.py'), '--check'],
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
