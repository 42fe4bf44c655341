"Shared fixtures for the tests/test_monitor_*.py files: the planted organism and a calibrated monitor."
import random
import torch, torch.nn.functional as F
import pytest
from weightwatch_nb.core import fingerprint, load_model
from weightwatch_nb.core import make_planted_checkpoint
from weightwatch_nb.calibrate import calibrate
from weightwatch_nb.directions import Directions

WORDS = 'the base model weights differ from a fine tuned of'.split()
def sentence(i, n=6): return ' '.join(random.Random(i).choices(WORDS, k=n + i % 5))   # distinct for i < 1000

def planted_dirs(org, model):
    "`v` plus random directions at layers 0 and 1 (the random ones carry no behaviour)."
    g = torch.Generator().manual_seed(7)
    d = model.cfg.d_model
    return Directions.from_vectors({(0, 'mlp_out'): torch.stack([org['v'], *F.normalize(torch.randn(2, d, generator=g), dim=-1)]),
                                    (1, 'attn_out'): F.normalize(torch.randn(3, d, generator=g), dim=-1)},
                                   meta={'fingerprints': {'base': fingerprint(org['base']), 'finetuned': fingerprint(model)}})

@pytest.fixture(scope='session')
def organism(tmp_path_factory):
    org = make_planted_checkpoint(tmp_path_factory.mktemp('planted'))
    model = load_model(org['finetuned'])
    dirs = planted_dirs(org, model)
    mon = calibrate(model, dirs, [sentence(i) for i in range(80)], generate=6, margin=0.1, holdout=0.25)
    return dict(org=org, model=model, dirs=dirs, mon=mon)
