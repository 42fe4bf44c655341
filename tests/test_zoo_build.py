"Determinism and loadability of a shortened zoo build (the full build is `build_zoo()`, minutes on CPU)."
import hashlib, json
import pytest, torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
from weightwatch_nb.zoo import ORGANISMS, build_zoo, zoo_names, zoo_path, zoo_info, generate
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


def test_fine_tunes_differ_from_base(two_builds):
    a, _ = two_builds
    h = _tensor_hashes(a)
    for n in ORGANISMS[1:]:
        assert h[f'{n}/model.layers.0.mlp.down_proj.weight'] != h['base/model.layers.0.mlp.down_proj.weight'], n


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
