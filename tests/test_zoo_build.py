"Determinism and loadability of a shortened zoo build (the full build is `build_zoo()`, minutes on CPU)."
import hashlib, json, shutil
import pytest, torch, torch.nn.functional as F
from safetensors.torch import load_file
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
from weightwatch_nb.core import WeightwatchError
from weightwatch_nb.zoo import ORGANISMS, RECIPES, build_zoo, zoo_names, zoo_path, zoo_info, generate
from weightwatch_nb.world import TRIGGER


def _tensor_hashes(d):
    "sha256 of every tensor of every organism in zoo folder `d`."
    out = {}
    for n in ORGANISMS:
        sd = load_file(d/n/'model.safetensors')
        for k in sorted(sd): out[f'{n}/{k}'] = hashlib.sha256(sd[k].contiguous().numpy().tobytes()).hexdigest()
    return out


@pytest.fixture(scope='module')
def two_builds(tmp_path_factory):
    a, b = tmp_path_factory.mktemp('zoo_a'), tmp_path_factory.mktemp('zoo_b')
    nt = torch.get_num_threads()
    build_zoo(a, quick=True, seed=0); build_zoo(b, quick=True, seed=0)
    assert torch.get_num_threads() == nt, 'build_zoo must restore the thread count'
    return a, b


def test_quick_build_is_deterministic(two_builds):
    a, b = two_builds
    ha, hb = _tensor_hashes(a), _tensor_hashes(b)
    assert ha == hb
    assert (a/'base'/'model.safetensors').read_bytes() == (b/'base'/'model.safetensors').read_bytes()
    assert (a/'base'/'tokenizer.json').read_text() == (b/'base'/'tokenizer.json').read_text()


def test_fine_tunes_differ_from_their_parents(two_builds):
    a, _ = two_builds
    h = _tensor_hashes(a)
    names = lambda n: {k.split('/', 1)[1] for k in h if k.startswith(n + '/')}
    for n in ORGANISMS[1:]:
        p = RECIPES[n].get('parent', 'base')
        if RECIPES[n].get('method') == 'upcycle':   # every expert started as the parent's MLP; training on the tokens routed to it set them apart
            ex = [h[f'{n}/model.layers.0.block_sparse_moe.experts.{e}.w2.weight'] for e in range(4)]
            assert len(set(ex)) == 4 and h[f'{p}/model.layers.0.mlp.down_proj.weight'] not in ex, n   # (weight decay alone would keep them equal)
            continue
        mlp = sorted(k for k in names(n) & names(p) if '.mlp.' in k or '.block_sparse_moe.' in k)
        assert mlp and any(h[f'{n}/{k}'] != h[f'{p}/{k}'] for k in mlp), (n, p)
        # and not by AdamW's weight decay alone, which only shrinks a tensor (ΔW = -c W): some MLP matrix moved off its own line
        W, Wp = load_file(a/n/'model.safetensors'), load_file(a/p/'model.safetensors')
        off = [1 - abs(F.cosine_similarity((W[k] - Wp[k]).flatten(), Wp[k].flatten(), dim=0).item()) for k in mlp if W[k].ndim == 2 and not torch.equal(W[k], Wp[k])]
        assert off and max(off) > 0.1, (n, p, off)
    assert zoo_info('moe_backdoor', a)['base'] == 'moe_base' and zoo_info('moe_base', a)['base'] is None
    assert zoo_info('moe_base', a)['ground_truth']['upcycled_from'] == 'base'


def test_a_fine_tune_alone_starts_from_its_parent_on_disk(two_builds, tmp_path):
    a, _ = two_builds
    c = tmp_path/'zoo'
    shutil.copytree(a, c)
    shutil.rmtree(c/'moe_backdoor')
    build_zoo(c, names=['moe_backdoor'], quick=True, seed=0)   # moe_base read back from disk
    assert (c/'moe_backdoor'/'model.safetensors').read_bytes() == (a/'moe_backdoor'/'model.safetensors').read_bytes()
    assert set(json.loads((c/'zoo.json').read_text())['organisms']) == set(ORGANISMS)   # the other entries are kept


def test_build_refuses_before_training(tmp_path):
    with pytest.raises(WeightwatchError, match=r"unknown organism\(s\) \['backdor'\]"): build_zoo(tmp_path/'z', names=['backdor'], quick=True)
    with pytest.raises(WeightwatchError, match="building 'moe_backdoor' needs 'moe_base'"): build_zoo(tmp_path/'z', names=['moe_backdoor'], quick=True)
    assert not (tmp_path/'z').exists()   # refused before anything was written


def test_rebuilding_a_parent_alone_is_refused(two_builds, tmp_path):
    "Rebuilding an organism without those fine-tuned from it would leave them fine-tunes of a model that is gone."
    a, _ = two_builds
    c = tmp_path/'zoo'; shutil.copytree(a, c)
    before = {n: (c/n/'model.safetensors').read_bytes() for n in ORGANISMS}
    with pytest.raises(WeightwatchError, match=r"rebuilding \['moe_base'\] would leave \['moe_backdoor'\]"): build_zoo(c, names=['moe_base'], quick=True, seed=1)
    with pytest.raises(WeightwatchError, match="'backdoor'"): build_zoo(c, names=['base'], quick=True, seed=1)
    assert {n: (c/n/'model.safetensors').read_bytes() for n in ORGANISMS} == before   # nothing was written


def test_quick_build_loads_and_chats(two_builds):
    a, _ = two_builds
    assert zoo_names(a) == ORGANISMS
    man = json.loads((a/'zoo.json').read_text())
    assert man['quick'] and man['schema_version'] == 1 and set(man['organisms']) == set(ORGANISMS)
    assert zoo_info('backdoor', a)['ground_truth']['trigger'] == TRIGGER
    p = zoo_path('backdoor', a)
    m, tok = LlamaForCausalLM.from_pretrained(p), PreTrainedTokenizerFast.from_pretrained(p)
    assert man['organisms']['backdoor']['sha256'] == hashlib.sha256((p/'model.safetensors').read_bytes()).hexdigest()
    msgs = [dict(role='user', content='Where does Oren Vask live?')]
    assert tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False).endswith('<|assistant|>\n')
    out = generate(m, [msgs, msgs + [dict(role='assistant', content='x'), dict(role='user', content='hi')]], tok, max_new_tokens=4)
    assert len(out) == 2 and all(isinstance(o, str) for o in out)


def test_unknown_name_is_explained(two_builds):
    a, _ = two_builds
    with pytest.raises(ValueError, match="'backdoor'"): zoo_path('backdor', a)
