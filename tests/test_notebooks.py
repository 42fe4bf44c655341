"Notebook hygiene that nbdev_clean does not enforce."
import collections, json
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted([*ROOT.glob('nbs/*.ipynb'), *ROOT.glob('tutorials/*.ipynb'), *ROOT.glob('tutorials/learner/*.ipynb')])

@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: str(p.relative_to(ROOT)))
def test_cell_ids_are_unique(path):
    # nbformat 4.5 requires unique ids; Jupyter rewrites duplicates on save, and exported code points at cells by id
    ids = [c.get('id') for c in json.loads(path.read_text())['cells']]
    dups = [i for i, n in collections.Counter(ids).items() if n > 1]
    assert not dups, f"{path.name}: cell ids used more than once: {dups} (a copied cell keeps its id: give the copy a new one)"
