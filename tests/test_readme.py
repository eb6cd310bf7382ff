"""README's python snippets run as written and print what their comments say."""

import contextlib
import io
import os
import re

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'README.md')


def test_readme_snippets_print_what_they_claim():
  with open(README, encoding='utf-8') as f:
    text = f.read()
  blocks = re.findall(r'```python\n(.*?)```', text, re.S)
  assert len(blocks) >= 3, 'README lost its attention / encoder-decoder / decoding snippets'
  scope: dict = {}
  for block in blocks:  # later snippets use the names of earlier ones, as a reader would
    claimed = [line.split('#', 1)[1].strip() for line in block.splitlines()
               if line.startswith('print(') and '#' in line]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      exec(compile(block, README, 'exec'), scope)
    assert out.getvalue().splitlines() == claimed, block
