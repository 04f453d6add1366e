"""Writes README.md from the fragments in docs/ (edit those, then run this).

  python docs/build_readme.py          # rewrite README.md
  python docs/build_readme.py --check  # exit 1 if README.md is out of date
"""

from __future__ import annotations

import os
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(os.path.dirname(DOCS), 'README.md')
# In reading order; each fragment starts with its own '##' heading.
FRAGMENTS = ('overview', 'input_pipeline', 'training', 'checkpoints', 'benchmarks',
             'visualize')


def assemble() -> str:
  parts = []
  for name in FRAGMENTS:
    with open(os.path.join(DOCS, f'{name}.md'), encoding='utf-8') as f:
      parts.append(f.read().rstrip('\n') + '\n')
  return '\n'.join(parts)


def main(argv: list[str]) -> int:
  text = assemble()
  if '--check' in argv:
    with open(README, encoding='utf-8') as f:
      if f.read() != text:
        print('README.md is out of date: run python docs/build_readme.py', file=sys.stderr)
        return 1
    return 0
  with open(README, 'w', encoding='utf-8') as f:
    f.write(text)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
