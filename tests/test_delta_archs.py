"Weight deltas and directions beyond the notebooks' two architectures: Llama-family relatives, GPT-NeoX, sharded and bf16 checkpoints, GPT-2 LoRA."
import contextlib, io, json, shutil, warnings
from pathlib import Path
import pytest, torch
from weightwatch_nb.core import WeightwatchError, make_tiny_checkpoint, load_hf, load_model, fingerprint, same_weights
from weightwatch_nb.delta import FAMILIES, MATRICES, arch_info, iter_deltas, plant_update, subspace_cosines, open_tensors, orient, put_oriented, find_keys, MLA, NO_PRE_NORM
from weightwatch_nb.calibrate import check_hooks
from weightwatch_nb.directions import Directions, compute_directions

def tiny(arch, path, seed=0):
    "Save a tiny random model of a Hugging Face architecture not covered by `make_tiny_checkpoint`."
    import transformers as T
    torch.manual_seed(seed)
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
    cfg = {'mistral': lambda: T.MistralConfig(num_key_value_heads=2, **common),
           'qwen2': lambda: T.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, **common),
           'gpt_neox': lambda: T.GPTNeoXConfig(**common),
           'phi3': lambda: T.Phi3Config(num_key_value_heads=2, pad_token_id=0, **common),
           'phi': lambda: T.PhiConfig(**common),
           'gptj': lambda: T.GPTJConfig(vocab_size=300, n_embd=64, n_inner=160, n_layer=2, n_head=4, n_positions=64, rotary_dim=8)
          }.get(arch, lambda: T.AutoConfig.for_model(arch, num_key_value_heads=2, head_dim=16, pad_token_id=0, **common))()
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path

NEWER = ['olmo3', 'smollm3', 'granite', 'stablelm', 'hunyuan_v1_dense', 'exaone4', 'cohere', 'cohere2', 'glm', 'glm4', 'arcee', 'nemotron', 'apertus', 'starcoder2', 'seed_oss']   # Llama's names or nearly (see `ARCH_SPECS`)

@pytest.mark.parametrize('arch', ['mistral', 'qwen2', 'gpt_neox', 'phi3', 'phi', 'gptj', *NEWER])
def test_planted_update_recovered(arch, tmp_path):
    b = tiny(arch, tmp_path/'base')
    truth = plant_update(b, tmp_path/'ft', {(0, 'mlp_out'): 3, (1, 'attn_out'): 2}, noise=1e-4)
    d = compute_directions(b, tmp_path/'ft', k=5, progress=False)
    for (l, m), U0 in truth.items():
        assert subspace_cosines(d[(l, m)][:U0.shape[1]].T, U0).min() >= 0.999
    assert Directions.load(d.save(tmp_path/'d.safetensors'), model=tmp_path/'ft').names() == d.names()

@pytest.mark.parametrize('arch', ['mistral', 'qwen2', 'gpt_neox', 'phi3', 'phi', 'gptj', *NEWER])
def test_every_matrix_oriented(arch, tmp_path):
    b = tiny(arch, tmp_path/'base')
    info = arch_info(json.loads((b/'config.json').read_text()))
    ms = [m for m in MATRICES if m in info['specs']]
    shapes = {m: tuple(D.shape) for l, m, D in iter_deltas(None, b, ms, mode='raw') if l == 1 or m == 'embed'}
    other = {'attn_out': info['q'], 'attn_q': info['q'], 'attn_k': info['kv'], 'attn_v': info['kv'], 'mlp_out': 160, 'mlp_in': 160,
             'mlp_gate': 160, 'embed': 300, 'unembed': 300}
    assert shapes == {m: (64, other[m]) for m in ms}
    if arch in ('mistral', 'phi3'): assert info['kv'] == 32   # grouped-query attention: k and v are narrower than q

def test_sharded_bf16_streaming_equals_loaded(tmp_path):
    b = make_tiny_checkpoint(tmp_path/'base', 'llama')
    plant_update(b, tmp_path/'ft', {(1, 'mlp_out'): 2}, noise=1e-3)
    for name in ('base', 'ft'):
        hf, tok = load_hf(tmp_path/name)
        hf.to(torch.bfloat16).save_pretrained(tmp_path/f'{name}16', max_shard_size='60KB'); tok.save_pretrained(tmp_path/f'{name}16')
    assert (tmp_path/'ft16'/'model.safetensors.index.json').exists()
    assert open_tensors(tmp_path/'ft16').get('model.layers.1.mlp.down_proj.weight').dtype == torch.bfloat16
    ds = compute_directions(tmp_path/'base16', tmp_path/'ft16', k=3, progress=False)
    dl = compute_directions(load_hf(tmp_path/'base16', dtype=torch.bfloat16)[0], load_hf(tmp_path/'ft16', dtype=torch.bfloat16)[0], k=3, progress=False)
    assert ds.names() == dl.names()
    for key, v in ds.vectors.items():
        assert v.dtype == torch.float32 and torch.equal(v, dl.vectors[key])

def test_gpt2_lora_equals_merged_and_fingerprint(tmp_path):
    from peft import LoraConfig, get_peft_model
    b = make_tiny_checkpoint(tmp_path/'base', 'gpt2')
    torch.manual_seed(0)
    pm = get_peft_model(load_hf(b)[0], LoraConfig(r=3, lora_alpha=6, target_modules=['c_attn', 'c_proj', 'c_fc'], fan_in_fan_out=True))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if 'lora_B' in n: p.normal_(0, 0.1)
    pm.save_pretrained(tmp_path/'lora')
    merged = pm.merge_and_unload()
    ms = ['attn_out', 'mlp_out', 'attn_q', 'attn_k', 'attn_v', 'mlp_in']
    dlo = compute_directions(b, lora=tmp_path/'lora', k=5, matrices=ms, progress=False)
    dme = compute_directions(b, merged, k=5, matrices=ms, method='exact', progress=False)
    assert dlo.names() == dme.names() and len(dlo) == 3 * 6 * 2
    for key in dlo.vectors: assert torch.allclose(dlo.vectors[key], dme.vectors[key], atol=1e-4)
    assert dlo.meta['fingerprints']['finetuned'] == fingerprint(load_model(tmp_path/'lora'))
    Directions.load(dlo.save(tmp_path/'d.safetensors'), model=load_model(tmp_path/'lora'))

def test_lora_that_also_trains_biases_and_whole_modules(tmp_path):
    "An adapter that trains biases (`bias='all'`), LoRA biases and a whole module (`modules_to_save`) besides B·A: its fingerprint is the model PEFT loads and merges, its directions are the merged model's, and the vectors it changed are on record."
    from peft import LoraConfig, get_peft_model
    from weightwatch_nb.delta import changed_vectors
    b = make_tiny_checkpoint(tmp_path/'base', 'gpt2')
    torch.manual_seed(0)
    pm = get_peft_model(load_hf(b)[0], LoraConfig(r=2, lora_alpha=4, target_modules=['c_attn', 'c_proj'], fan_in_fan_out=True, bias='all',
                                                  lora_bias=True, modules_to_save=['ln_f']))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad and 'lora_A' not in n: p.add_(torch.randn_like(p) * 0.1)
    pm.save_pretrained(tmp_path/'lora')
    merged = pm.merge_and_unload(); merged.save_pretrained(tmp_path/'merged')
    dlo = compute_directions(b, lora=tmp_path/'lora', k=2, matrices=['attn_out', 'mlp_out'], progress=False)   # (`ln_f`, retrained in full: a changed vector)
    dme = compute_directions(b, tmp_path/'merged', k=2, matrices=['attn_out', 'mlp_out'], method='exact', progress=False)
    assert dlo.names() == dme.names() and all(torch.allclose(dlo.vectors[k], dme.vectors[k], atol=1e-4) for k in dlo.vectors)
    assert dlo.meta['fingerprints']['finetuned'] == fingerprint(merged) == fingerprint(load_model(tmp_path/'lora'))   # before: the base's biases
    Directions.load(dlo.save(tmp_path/'d.safetensors'), model=load_model(tmp_path/'lora'))
    want = changed_vectors(open_tensors(b), open_tensors(tmp_path/'merged'))
    assert dlo.meta['changed_vectors'] == dme.meta['changed_vectors'] == want and {'transformer.ln_f.weight', 'transformer.h.0.attn.c_proj.bias'} <= set(want)

def _adapter(b, out, seed=0, **kw):
    "Save a PEFT adapter on checkpoint `b` with everything it trains (B, LoRA biases, biases, modules' copies, token rows) moved off its start; return PEFT's merged model."
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    pm = get_peft_model(load_hf(b)[0], LoraConfig(r=2, lora_alpha=4, **kw))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad: p.add_(torch.randn_like(p) * 0.1)   # (A too: PEFT starts an embedding's A at zero, and its B at random)
    pm.save_pretrained(out)
    return pm.merge_and_unload()

@pytest.mark.filterwarnings("ignore:.*tied", "ignore:Model with `tie_word_embeddings=True`")
@pytest.mark.parametrize('arch, kw', [('gpt2', dict(target_modules=['c_attn'], fan_in_fan_out=True, modules_to_save=['lm_head'])),   # tied: PEFT's own copy
                                      ('gpt2', dict(target_modules=['c_attn', 'lm_head'], fan_in_fan_out=True)),   # tied: merged into the shared tensor
                                      ('gpt2', dict(target_modules=['c_attn', 'wte'], fan_in_fan_out=True)),       # (an embedding's LoRA, stored [in, out])
                                      ('gpt2', dict(target_modules=['c_attn'], fan_in_fan_out=True, trainable_token_indices=[3, 5, 7])),
                                      ('llama', dict(target_modules=['q_proj', 'down_proj'], trainable_token_indices={'embed_tokens': [2, 9]})),
                                      ('llama', dict(target_modules=['q_proj'], modules_to_save=['o_proj', 'embed_tokens'])),
                                      ('llama', dict(target_modules=['q_proj'], modules_to_save=['lm_head'])),   # an untied unembedding: trained in full
                                      ('llama', dict(target_modules=['q_proj', 'lm_head'])),                     # or by LoRA
                                      ('gpt2', dict(target_modules=['c_attn'], fan_in_fan_out=True, modules_to_save=['wte'])),   # a tied pair: PEFT's copy
                                      ('gpt2', dict(target_modules=['c_attn'], fan_in_fan_out=True, modules_to_save=['wte', 'lm_head'])),   # unties it
                                      ('gpt2', dict(target_modules=['c_attn', 'lm_head'], fan_in_fan_out=True, modules_to_save=['wte'])),
                                      ('gpt2', dict(target_modules=['c_attn'], fan_in_fan_out=True, trainable_token_indices={'wte': [3, 5], 'lm_head': [4, 6]})),
                                      ('gpt_neox', dict(target_modules=['query_key_value', 'lm_head'])),   # its stored `embed_out` is PEFT's `lm_head`
                                      ('gpt_neox', dict(target_modules=['query_key_value'], modules_to_save=['lm_head'])),
                                      ('gpt_neox', dict(target_modules=['query_key_value'], trainable_token_indices={'lm_head': [4, 6]}))])
def test_adapters_on_embeddings_tokens_and_whole_modules(arch, kw, tmp_path):
    "Adapters that train a tied unembedding (a copy, which unties it, or LoRA merged into the tensor it shares), an embedding, token rows or whole matrices: every tensor and the unembedding are PEFT's merge, and so is the fingerprint, also after a delta was read from it and on a base loaded in memory; directions are the merged model's."
    from weightwatch_nb.delta import LoraTensors
    from weightwatch_nb.core import hf_state_dict
    from weightwatch_nb.edit import removed_weights, remove_directions
    b = make_tiny_checkpoint(tmp_path/'base', arch)
    merged = _adapter(b, tmp_path/'lora', **kw); want = hf_state_dict(merged)
    lt = LoraTensors(b, tmp_path/'lora')
    if (un := next((n for n in want if n in ('lm_head.weight', 'embed_out.weight')), None)):   # the unembedding PEFT's model has, untied or not
        plan = find_keys(lt.keys(), arch_info(lt.config), ['unembed'])
        assert torch.equal(lt.get(next(iter(plan.values()))[0]).to(want[un]), want[un])
    for _ in range(2):   # twice: reading deltas must not change what it holds (it hands out copies)
        assert all(torch.equal(lt.get(k).to(want[n]), want[n]) for n, k in lt.loaded.items() if n in want), [n for n, k in lt.loaded.items() if n in want and not torch.equal(lt.get(k).to(want[n]), want[n])]
        list(iter_deltas(b, lt, list(MATRICES[:2])))
    assert fingerprint(lt) == fingerprint(merged) == fingerprint(load_model(tmp_path/'lora'))
    base_un = hf_state_dict(load_hf(b)[0])['lm_head.weight']   # the unembedding's hash moves exactly when PEFT's merge moves it
    assert (fingerprint(lt)['unembed'] != fingerprint(b)['unembed']) == (not torch.equal(want['lm_head.weight'], base_un))
    if arch == 'gpt2':   # the base loaded in memory: a tied model's state lists its unembedding too, the same tensor
        assert fingerprint(LoraTensors(load_hf(b)[0], tmp_path/'lora')) == fingerprint(merged)
    # directions: what it trains in full or by rows (and a tied unembedding) is decomposed whole, as from PEFT's merged model
    ms = ['attn_out', 'attn_q', 'mlp_out', 'embed', 'unembed']
    dl, dm = (compute_directions(b, f, k=2, matrices=ms, progress=False, **x) for f, x in ((None, dict(lora=tmp_path/'lora')), (merged, {})))
    assert dl.names() == dm.names() and all(subspace_cosines(dl[key].T, dm[key].T).min() > 0.999 for key in dl.vectors), (dl.names(), dm.names())
    assert dl.meta['delta_norm'].keys() == dm.meta['delta_norm'].keys() and all(dl.meta['delta_norm'][n] == pytest.approx(v, rel=1e-4, abs=1e-6) for n, v in dm.meta['delta_norm'].items()), (dl.meta['delta_norm'], dm.meta['delta_norm'])
    if arch == 'llama':
        want_ms = {'attn_q', *(['unembed'] if 'lm_head' in str(kw) else ['embed', 'attn_out'] if 'modules_to_save' in kw else ['embed', 'mlp_out'])}
        assert {m for _, m in dl.vectors} == want_ms, dl.names()
    if arch == 'llama' and ('modules_to_save' in kw or 'lm_head' in kw['target_modules']):   # an edit of the lazily merged adapter is the edit of PEFT's merged model
        merged.save_pretrained(tmp_path/'merged'); load_hf(b)[1].save_pretrained(tmp_path/'merged')
        ms = ['attn_q', 'unembed'] if 'lm_head' in str(kw) else None   # (an untied unembedding trained in full: edited as a matrix of its own)
        lazy, full = (removed_weights(b, tmp_path/'lora', 1, ms, progress=False),
                      hf_state_dict(remove_directions(b, tmp_path/'merged', 1, ms, progress=False)))
        assert lazy and all(torch.equal(v.to(full[n]), full[n]) for n, v in lazy.items())
    if arch == 'gpt2' and 'modules_to_save' in kw:   # an adapter that unties a tied pair: its edited checkpoint is saved untied and loads back as such
        from weightwatch_nb.edit import save_edited
        out = save_edited(remove_directions(b, tmp_path/'lora', 1, ['attn_q', 'embed'], progress=False), None, tmp_path/'edited')
        back = load_model(out); sd = hf_state_dict(back)
        assert json.loads((out/'config.json').read_text())['tie_word_embeddings'] is False and sd['lm_head.weight'].data_ptr() != sd['transformer.wte.weight'].data_ptr()
        assert torch.equal(sd['lm_head.weight'], want['lm_head.weight'].to(sd['lm_head.weight']))   # the unembedding PEFT's merge has (not the edited embedding)
        assert same_weights(json.loads((out/'weightwatch_edit.json').read_text())['fingerprints']['edited'], fingerprint(back)) == 'exact'

def test_a_fine_tune_of_the_output_layer_alone_is_another_model(tmp_path):
    "Directions of a fine-tune that changed only `lm_head` are refused for its base (their fingerprints differ in the unembedding alone), and an edit of it reads back."
    from weightwatch_nb.calibrate import check_directions
    from weightwatch_nb.edit import interpolate, save_edited
    b = make_tiny_checkpoint(tmp_path/'base', 'llama', n_layers=2)
    h, tok = load_hf(b)
    with torch.no_grad(): h.lm_head.weight[:, :4] += 0.3 * torch.randn(h.lm_head.weight.shape[0], 1)   # a rank-one update of the output layer
    h.save_pretrained(tmp_path/'ft'); tok.save_pretrained(tmp_path/'ft')
    fb, ff = fingerprint(b), fingerprint(tmp_path/'ft')
    assert (fb['sha256'], fb['embed']) == (ff['sha256'], ff['embed']) and fb['unembed'] != ff['unembed'] and fb['id'] != ff['id']
    d = compute_directions(b, tmp_path/'ft', k=2, matrices=['unembed'], progress=False)
    check_directions(load_model(tmp_path/'ft'), d)
    with pytest.raises(WeightwatchError, match=r"its unembedding \(`lm_head`\) differs"): check_directions(load_model(b), d)
    half = save_edited(interpolate(b, tmp_path/'ft', 0.5, progress=False), None, tmp_path/'half')   # read back against its own fingerprint
    fh = fingerprint(half)
    assert same_weights(fh, fb) is None and same_weights(fh, ff) is None and same_weights(fh, fingerprint(load_model(half))) == 'exact'

@pytest.mark.filterwarnings("ignore:.*tied", "ignore:Model with `tie_word_embeddings=True`")
def test_a_tied_config_over_a_stored_head_of_its_own(tmp_path):
    "A checkpoint whose config says tied but which stores an lm_head that differs from its embedding loads untied (transformers keeps both): it is fingerprinted so, its edits keep both, and an adapter on it (which PEFT ties by the config) is refused with the fix."
    from safetensors.torch import load_file, save_file
    from weightwatch_nb.delta import LoraTensors
    from weightwatch_nb.core import hf_state_dict
    from weightwatch_nb.edit import interpolate, save_edited, remove_directions
    b, f = make_tiny_checkpoint(tmp_path/'base', 'gpt2', n_layers=2), make_tiny_checkpoint(tmp_path/'ft', 'gpt2', n_layers=2)
    sd = load_file(f/'model.safetensors'); sd['lm_head.weight'] = sd['transformer.wte.weight'].clone(); sd['lm_head.weight'][:, :3] += 0.5
    save_file(sd, f/'model.safetensors', metadata={'format': 'pt'})
    hf = load_hf(f)[0]
    assert not torch.equal(hf.lm_head.weight, hf.transformer.wte.weight)   # what transformers makes of it
    assert fingerprint(f) == fingerprint(hf) == fingerprint(load_model(f)) and same_weights(fingerprint(f), fingerprint(b)) is None
    d = compute_directions(b, f, k=2, matrices=['unembed'], progress=False)   # the head's own update: rank one, ||[0.5]*3 columns||
    assert torch.allclose(d.S[(1, 'unembed')], torch.tensor([0.5 * (3 * 300) ** 0.5]), rtol=1e-4)
    half = save_edited(interpolate(b, f, 0.5, matrices=['unembed'], progress=False), None, tmp_path/'half')   # it reads back
    assert same_weights(fingerprint(half), fingerprint(load_model(half))) == 'exact'
    e = remove_directions(load_model(b), load_model(f), 1, ['attn_q'], progress=False)   # an edit from bridges: the copy it edits is untied too
    esd = hf_state_dict(e)
    assert torch.equal(esd['transformer.wte.weight'], sd['transformer.wte.weight']) and torch.equal(esd['lm_head.weight'], sd['lm_head.weight'])
    blocks = _adapter(f, tmp_path/'lora', target_modules=['c_attn'], fan_in_fan_out=True)   # an adapter of the blocks alone: unambiguous, read
    assert fingerprint(LoraTensors(f, tmp_path/'lora')) == fingerprint(blocks) == fingerprint(LoraTensors(load_hf(f)[0], tmp_path/'lora'))
    kinds = [dict(target_modules=['c_attn', 'lm_head']), dict(target_modules=['c_attn', 'wte']), dict(target_modules=['c_attn'], modules_to_save=['lm_head']),
             dict(target_modules=['c_attn'], trainable_token_indices=[3, 5])]
    for i, kw in enumerate(kinds):   # adapters that train the pair: what they make is ambiguous, so refused with the fix, from the folder or loaded
        _adapter(f, tmp_path/f'pair{i}', fan_in_fan_out=True, **kw)
        for base in (f, load_hf(f)[0]):
            with pytest.raises(WeightwatchError, match='set `tie_word_embeddings` to false'): LoraTensors(base, tmp_path/f'pair{i}')
        assert fingerprint(LoraTensors(b, tmp_path/f'pair{i}' if i else tmp_path/'lora'))   # (an ordinary tied base: read as ever)
    c = json.loads((f/'config.json').read_text()); c['tie_word_embeddings'] = False; (f/'config.json').write_text(json.dumps(c))   # the fix, as the message gives it
    for i, kw in enumerate(kinds):
        merged = _adapter(f, tmp_path/f'fixed{i}', fan_in_fan_out=True, **kw)
        assert fingerprint(LoraTensors(f, tmp_path/f'fixed{i}')) == fingerprint(merged) == fingerprint(load_model(tmp_path/f'fixed{i}'))

def test_what_else_the_unembedding_fingerprint_covers(tmp_path):
    "The unembedding's bias (Phi, GPT-J) is part of its hash; a tied checkpoint that stores only lm_head is read as transformers ties it; an lm_head offloaded to disk is left out, not a crash."
    from safetensors.torch import load_file, save_file
    from weightwatch_nb.core import hf_state_dict
    import transformers as T
    for arch in ('phi', 'gptj'):
        b = tiny(arch, tmp_path/arch); h = load_hf(b)[0]
        with torch.no_grad(): h.lm_head.bias.add_(0.1)   # only the output layer's bias
        h.save_pretrained(tmp_path/f'{arch}-bias')
        assert same_weights(fingerprint(b), fingerprint(tmp_path/f'{arch}-bias')) is None and fingerprint(tmp_path/f'{arch}-bias') == fingerprint(h)
    d = make_tiny_checkpoint(tmp_path/'llama', 'llama', n_layers=2); sd = load_file(d/'model.safetensors')
    def only_head(name, W):   # a tied config whose checkpoint stores the shared tensor as lm_head only
        e = tmp_path/name; shutil.copytree(d, e)
        save_file({k: v for k, v in sd.items() if k not in ('model.embed_tokens.weight', 'lm_head.weight')} | {'lm_head.weight': W}, str(e/'model.safetensors'), metadata={'format': 'pt'})
        c = json.loads((e/'config.json').read_text()); c['tie_word_embeddings'] = True; (e/'config.json').write_text(json.dumps(c))
        return e
    W2 = sd['model.embed_tokens.weight'].clone(); W2[5] += 0.5
    ob, of = only_head('only-base', sd['model.embed_tokens.weight']), only_head('only-ft', W2)
    assert fingerprint(ob) == fingerprint(load_hf(ob)[0]) and same_weights(fingerprint(ob), fingerprint(of)) is None
    pytest.importorskip('accelerate')
    off = T.AutoModelForCausalLM.from_pretrained(d, device_map={'model': 'cpu', 'lm_head': 'disk'}, offload_folder=str(tmp_path/'off'))
    assert off.lm_head.weight.device.type == 'meta'
    fo = fingerprint(off)
    assert 'unembed' not in fo and same_weights(fingerprint(d), fo) == 'exact'
    from weightwatch_nb.delta import LoraTensors   # a tied base whose pair is offloaded: not taken for one held apart
    g = make_tiny_checkpoint(tmp_path/'gpt2', 'gpt2', n_layers=2); merged = _adapter(g, tmp_path/'g-lora', target_modules=['c_attn'], fan_in_fan_out=True)
    goff = T.AutoModelForCausalLM.from_pretrained(g, device_map={'transformer.wte': 'disk', 'lm_head': 'disk', 'transformer.wpe': 'cpu', 'transformer.h': 'cpu',
                                                                 'transformer.ln_f': 'cpu'}, offload_folder=str(tmp_path/'goff'))
    lt = LoraTensors(goff, tmp_path/'g-lora')
    assert torch.equal(lt.get('transformer.h.0.attn.c_attn.weight'), hf_state_dict(merged)['transformer.h.0.attn.c_attn.weight'])

def test_lfm2_copy_of_a_tied_side_unties_under_its_older_key_too(tmp_path):
    "LiquidAI's LFM2 configs say `tie_embedding`, which the class reads before `tie_word_embeddings`: an adapter's copy of lm_head unties the pair there too."
    import transformers as T
    from weightwatch_nb.core import tiny_tokenizer
    from weightwatch_nb.delta import LoraTensors
    cfg = T.AutoConfig.for_model('lfm2', vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, layer_types=['conv', 'full_attention'])
    torch.manual_seed(0); T.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path/'b'); tiny_tokenizer(300).save_pretrained(tmp_path/'b')
    c = json.loads((tmp_path/'b'/'config.json').read_text()); c['tie_embedding'] = True; (tmp_path/'b'/'config.json').write_text(json.dumps(c))   # as on the hub
    merged = _adapter(tmp_path/'b', tmp_path/'lora', target_modules=['q_proj'], modules_to_save=['lm_head'])
    assert fingerprint(LoraTensors(tmp_path/'b', tmp_path/'lora')) == fingerprint(merged) == fingerprint(load_model(tmp_path/'lora'))

@pytest.mark.filterwarnings("ignore:.*tied", "ignore:Model with `tie_word_embeddings=True`", "ignore:Setting `save_embedding_layers`")
def test_saved_copies_of_a_tied_pair_load_into_the_shared_tensor(tmp_path):
    "PEFT saves an adapted lm_head's (or embedding's) base weight with the adapter and loads it back over the base's: on a tied model into the one tensor both share."
    from safetensors.torch import load_file, save_file
    from peft import PeftModel
    from weightwatch_nb.delta import LoraTensors
    a, b = make_tiny_checkpoint(tmp_path/'a', 'gpt2', n_layers=2, seed=0), make_tiny_checkpoint(tmp_path/'b', 'gpt2', n_layers=2, seed=1)
    bare = Path(shutil.copytree(b, tmp_path/'bare'))   # the same weights stored without the `transformer.` prefix (older GPT-2 checkpoints)
    save_file({k.removeprefix('transformer.'): v for k, v in load_file(b/'model.safetensors').items()}, bare/'model.safetensors', metadata={'format': 'pt'})
    for i, kw in enumerate([dict(target_modules=['c_attn', 'lm_head']), dict(target_modules=['c_attn', 'wte'], save_embedding_layers=True)]):
        save = kw.pop('save_embedding_layers', 'auto')
        from peft import LoraConfig, get_peft_model
        torch.manual_seed(i); pm = get_peft_model(load_hf(a)[0], LoraConfig(r=2, fan_in_fan_out=True, **kw))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if p.requires_grad: p.add_(torch.randn_like(p) * 0.1)
        pm.save_pretrained(tmp_path/f'lora{i}', save_embedding_layers=save)   # saved on base `a`, used on base `b`: PEFT's merge starts from `a`'s copy
        for base in (b, bare):
            merged = PeftModel.from_pretrained(load_hf(base)[0], tmp_path/f'lora{i}').merge_and_unload()
            lt = LoraTensors(base, tmp_path/f'lora{i}')
            emb = next(k for k in lt.keys() if k.endswith('wte.weight'))
            assert torch.equal(lt.get(emb), merged.transformer.wte.weight), (i, base)
            assert fingerprint(lt) == fingerprint(merged), (i, base)
    assert not torch.equal(load_file(a/'model.safetensors')['transformer.wte.weight'], load_file(b/'model.safetensors')['transformer.wte.weight'])

@pytest.mark.filterwarnings("ignore:.*tied", "ignore:Model with `tie_word_embeddings=True`", "ignore:Setting `save_embedding_layers`")
def test_a_tied_unembedding_keeps_its_own_bias(tmp_path):
    "Phi's lm_head has a bias; tied, its weight is the embedding's but its bias is its own (it was read as the embedding matrix)."
    import transformers as T
    from peft import PeftModel
    from weightwatch_nb.delta import LoraTensors
    from weightwatch_nb.core import hf_state_dict
    torch.manual_seed(0)
    T.PhiForCausalLM(T.PhiConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                 max_position_embeddings=64, tie_word_embeddings=True)).save_pretrained(tmp_path/'b')
    for i, kw in enumerate([dict(target_modules=['q_proj', 'v_proj'], bias='all'), dict(target_modules=['q_proj', 'lm_head'], bias='all')]):
        _adapter(tmp_path/'b', tmp_path/f'l{i}', **kw)
        merged = PeftModel.from_pretrained(load_hf(tmp_path/'b')[0], tmp_path/f'l{i}').merge_and_unload(); want = hf_state_dict(merged)
        lt = LoraTensors(tmp_path/'b', tmp_path/f'l{i}')
        assert not torch.equal(want['lm_head.bias'], load_hf(tmp_path/'b')[0].lm_head.bias)   # the adapter trained it
        assert all(torch.equal(lt.get(k).to(want[n]), want[n]) for n, k in lt.loaded.items() if n in want), i
        assert fingerprint(lt) == fingerprint(merged), i

def test_a_fine_tune_stored_narrower_than_its_base_is_compared_at_its_precision(tmp_path):
    "A bfloat16 fine-tune of a float32 base: the matrices it did not change are its base rounded, which is no update (no noise directions)."
    from safetensors.torch import load_file, save_file
    b = make_tiny_checkpoint(tmp_path/'b', 'llama', n_layers=2)
    f = Path(shutil.copytree(b, tmp_path/'f'))
    sd = load_file(b/'model.safetensors'); assert all(v.dtype == torch.float32 for v in sd.values())
    k = 'model.layers.1.mlp.down_proj.weight'; g = torch.Generator().manual_seed(0)
    u, w = torch.randn(sd[k].shape[0], 1, generator=g), torch.randn(1, sd[k].shape[1], generator=g)
    ft = {n: (v + 0.5 * (u @ w) / (u.norm() * w.norm()) if n == k else v).to(torch.bfloat16) for n, v in sd.items()}
    save_file(ft, f/'model.safetensors', metadata={'format': 'pt'})
    D = {(l, m): d for l, m, d in iter_deltas(b, f, matrices=['attn_out', 'mlp_out'])}
    assert all(not d.any() for lm, d in D.items() if lm != (1, 'mlp_out')), [lm for lm, d in D.items() if d.any()]   # rounding alone: zero
    S = torch.linalg.svdvals(D[(1, 'mlp_out')])
    assert abs(S[0] - 0.5) < 0.01 and S[1] < 0.01 * S[0], S[:3]   # the planted update, as bfloat16 holds it
    for ftm in (f, load_hf(f)[0], load_model(f)):   # the folder, or the checkpoint loaded (in float32, as load_hf and load_model do by default)
        d = compute_directions(b, ftm, k=2, matrices=['attn_out', 'mlp_out'], progress=False)
        assert sorted(d.meta['unchanged']) == ['L0.attn_out', 'L0.mlp_out', 'L1.attn_out'], d.meta['unchanged']

def test_lora_bias_on_a_layer_without_one_is_refused_for_what_it_is(tmp_path):
    "PEFT trains and runs LoRA biases on layers with no bias of their own but cannot merge them: refused, with that reason (not 'another model')."
    from weightwatch_nb.delta import LoraTensors
    b = make_tiny_checkpoint(tmp_path/'base', 'llama')
    with pytest.raises(RuntimeError, match='Impossible to merge LoRA with `lora_bias=True`'): _adapter(b, tmp_path/'lora', target_modules=['o_proj'], lora_bias=True)
    with pytest.raises(WeightwatchError, match=r"trains a LoRA bias \(lora_bias=True\) on 2 layer\(s\) that have no bias.*cannot merge it"): LoraTensors(b, tmp_path/'lora')

def test_changed_vectors_are_named_as_loaded_at_the_narrower_precision(tmp_path):
    "Changed norm gains are found whatever the base's checkpoint calls them (the hub's GPT-2 drops `transformer.`), named as loaded; a fine-tune saved in bfloat16 has not changed every vector."
    from safetensors.torch import load_file, save_file
    import shutil
    b = make_tiny_checkpoint(tmp_path/'base', 'gpt2')
    torch.manual_seed(0)   # vectors that bfloat16 cannot hold exactly (a fresh model's ones and zeros it can)
    save_file({k: v + 0.01 * torch.randn_like(v) if v.ndim == 1 else v for k, v in load_file(b/'model.safetensors').items()}, b/'model.safetensors', metadata={'format': 'pt'})
    plant_update(b, tmp_path/'ft', {(1, 'mlp_out'): 1})
    sd = load_file(tmp_path/'ft'/'model.safetensors'); sd['transformer.h.0.ln_1.weight'] += 0.25; save_file(sd, tmp_path/'ft'/'model.safetensors', metadata={'format': 'pt'})
    shutil.copytree(b, tmp_path/'old'); save_file({k.removeprefix('transformer.'): v for k, v in load_file(b/'model.safetensors').items()}, tmp_path/'old'/'model.safetensors', metadata={'format': 'pt'})
    for base, ft in ((b, tmp_path/'ft'), (tmp_path/'old', tmp_path/'ft'), (tmp_path/'old', load_hf(tmp_path/'ft')[0])):
        assert compute_directions(base, ft, k=1, progress=False).meta['changed_vectors'] == ['transformer.h.0.ln_1.weight'], (base, ft)
    load_hf(tmp_path/'ft', dtype=torch.bfloat16)[0].save_pretrained(tmp_path/'ft16')   # every tensor rounded, one vector changed
    exact = {k for k, v in load_file(b/'model.safetensors').items() if v.ndim == 1 and torch.equal(v, v.bfloat16().float())}
    assert not exact and compute_directions(b, tmp_path/'ft16', k=1, progress=False).meta['changed_vectors'] == ['transformer.h.0.ln_1.weight']

@pytest.mark.filterwarnings("ignore:directions of")
def test_no_delta_messages_say_what_did_change(tmp_path):
    "Nothing changed where asked: the error names the blocks where the asked-for matrices did change, a few new token rows of the embedding, or (raw mode) says the matrices are zero."
    from safetensors.torch import load_file, save_file
    b = make_tiny_checkpoint(tmp_path/'base', 'llama')
    plant_update(b, tmp_path/'ft', {(1, 'attn_out'): 1})
    with pytest.raises(WeightwatchError, match=r"in every requested matrix \(attn_out, mlp_out of blocks \[0\]\).*It changes attn_out in blocks \[1\]: pass those blocks \(--layers\)"):
        compute_directions(b, tmp_path/'ft', layers=[0], progress=False)
    with pytest.raises(WeightwatchError, match=r"\(mlp_out of blocks \[0\]\).*It changes attn_out in blocks \[1\]: ask for those"):   # another matrix, another block
        compute_directions(b, tmp_path/'ft', matrices=['mlp_out'], layers=[0], progress=False)
    hb, hf_, _ = _plain_pair('bamba', tmp_path/'bamba', {(1, 'attn_q'): 1})   # block 0 is a Mamba block: no attention to ask for
    with pytest.raises(WeightwatchError, match=r"this bamba model has no attn_q in blocks \[0\]: it has attn_q in blocks \[1\]"):
        compute_directions(hb, hf_, matrices=['attn_q'], layers=[0], progress=False)
    import shutil; shutil.copytree(b, tmp_path/'tok')   # two new tokens' rows: 2 of the embedding's rows, which 64 sampled rows of a real vocabulary would miss
    sd = load_file(b/'model.safetensors'); sd['model.embed_tokens.weight'][[3, 7]] += 0.5; save_file(sd, tmp_path/'tok'/'model.safetensors', metadata={'format': 'pt'})
    with pytest.raises(WeightwatchError, match=r"changes other matrices: ask for them \(--matrices embed\)"): compute_directions(b, tmp_path/'tok', progress=False)
    assert compute_directions(b, tmp_path/'tok', matrices=['embed'], k=1, progress=False).names() == ['L0.embed.u0']
    zero = {k: torch.zeros_like(v) if 'o_proj' in k or 'down_proj' in k else v for k, v in load_file(b/'model.safetensors').items()}
    shutil.copytree(b, tmp_path/'zero'); save_file(zero, tmp_path/'zero'/'model.safetensors', metadata={'format': 'pt'})
    with pytest.raises(WeightwatchError, match=r"every requested matrix of the fine-tuned model \(attn_out, mlp_out\) is zero"): compute_directions(None, tmp_path/'zero', mode='raw', progress=False)

@pytest.mark.filterwarnings("ignore:.*tied", "ignore:Model with `tie_word_embeddings=True`")
def test_no_delta_messages_for_adapters_of_tied_models(tmp_path):
    "A tied GPT-2 whose adapter retrains only lm_head (a copy: it unties the pair), or only the position embedding (no matrix name maps it): the error names what did change; a matrix it lacks is refused before any warning about where it would be compared."
    b = make_tiny_checkpoint(tmp_path/'base', 'gpt2')
    _adapter(b, tmp_path/'head', target_modules=['c_attn'], fan_in_fan_out=True, modules_to_save=['lm_head'], init_lora_weights=True)
    _adapter(b, tmp_path/'wpe', target_modules=['c_attn'], fan_in_fan_out=True, modules_to_save=['wpe'])
    for a in ('head', 'wpe'):   # (their LoRA left at zero: only the copies changed)
        from safetensors.torch import load_file, save_file
        sd = load_file(tmp_path/a/'adapter_model.safetensors'); save_file({k: torch.zeros_like(v) if 'lora_B' in k else v for k, v in sd.items()}, tmp_path/a/'adapter_model.safetensors')
    with pytest.raises(WeightwatchError, match=r"changes other matrices: ask for them \(--matrices unembed\)"):
        compute_directions(b, lora=tmp_path/'head', matrices=['attn_out', 'mlp_out'], progress=False)
    with pytest.warns(UserWarning, match=r"retrains in full 1 matrix that no gpt2 matrix maps to"):
        with pytest.raises(WeightwatchError, match=r"It changes only matrices that no matrix name maps to \(e.g. \['transformer.wpe.weight'\]"):
            compute_directions(b, lora=tmp_path/'wpe', progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter('error')   # refused first: no warning about a hook point for a matrix it does not have
        with pytest.raises(WeightwatchError, match="gpt2 has no `mlp_gate` matrix"): compute_directions(b, lora=tmp_path/'head', matrices=['attn_out', 'mlp_gate'], progress=False)

def test_adapter_loaded_in_bfloat16_is_the_float32_merge_rounded(tmp_path):
    "An adapter loaded at bfloat16 on a float32 base is merged in float32 and then rounded, so it is the model its float32 directions and monitors were made for, at another precision."
    from weightwatch_nb.core import same_weights
    b = make_tiny_checkpoint(tmp_path/'base', 'llama')
    _adapter(b, tmp_path/'lora', target_modules=['q_proj', 'o_proj', 'down_proj', 'embed_tokens'])
    d = compute_directions(b, lora=tmp_path/'lora', k=2, progress=False)
    m16 = load_model(tmp_path/'lora', dtype=torch.bfloat16)
    assert same_weights(d.meta['fingerprints']['finetuned'], fingerprint(m16)) == 'precision'
    Directions.load(d.save(tmp_path/'d.safetensors'), model=m16)

def test_no_delta_in_the_requested_matrices_names_the_changed_ones(tmp_path):
    "A LoRA on q and v, asked for the default matrices: the error names the matrices it did change, as --matrices."
    b = make_tiny_checkpoint(tmp_path/'base', 'llama')
    _adapter(b, tmp_path/'lora', target_modules=['q_proj', 'v_proj'])
    with pytest.raises(WeightwatchError, match=r"changes other matrices: ask for them \(--matrices attn_q,attn_v\)"): compute_directions(b, lora=tmp_path/'lora', progress=False)

def test_bad_pairs(tmp_path):
    b = make_tiny_checkpoint(tmp_path/'a', 'llama')
    w = make_tiny_checkpoint(tmp_path/'w', 'llama', d_model=32)
    with pytest.raises(WeightwatchError, match='differ in `hidden_size`'): compute_directions(b, w, progress=False)
    hf, tok = load_hf(b)
    with torch.no_grad(): hf.model.layers[1].mlp.down_proj.weight[0, 0] = float('inf')
    hf.save_pretrained(tmp_path/'inf')
    with pytest.raises(WeightwatchError, match='of the base model has NaN or Inf'): compute_directions(tmp_path/'inf', b, progress=False)
    data = (b/'model.safetensors').read_bytes()
    (tmp_path/'trunc').mkdir(); (tmp_path/'trunc'/'config.json').write_text((b/'config.json').read_text())
    (tmp_path/'trunc'/'model.safetensors').write_bytes(data[:len(data)//2])
    with pytest.raises(WeightwatchError, match='missing, truncated or not safetensors'): compute_directions(b, tmp_path/'trunc', progress=False)
    with pytest.raises(WeightwatchError, match='no such checkpoint directory'): compute_directions(b, tmp_path/'nope', progress=False)

def test_lora_on_bfloat16_base_matches_at_both_precisions(tmp_path):
    "Directions of a LoRA on a checkpoint stored in bfloat16 belong to the merged model, run in float32 or in bfloat16."
    from peft import LoraConfig, get_peft_model
    b = make_tiny_checkpoint(tmp_path/'base32', 'llama')
    hf, tok = load_hf(b, dtype=torch.bfloat16)
    hf.save_pretrained(tmp_path/'base'); tok.save_pretrained(tmp_path/'base')
    torch.manual_seed(0)
    pm = get_peft_model(load_hf(tmp_path/'base', dtype=torch.bfloat16)[0], LoraConfig(r=2, lora_alpha=4, target_modules=['down_proj', 'o_proj']))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if 'lora_B' in n: p.normal_(0, 0.05)
    pm.save_pretrained(tmp_path/'lora')
    d = compute_directions(tmp_path/'base', lora=tmp_path/'lora', k=2, progress=False)
    for dt, want in ((torch.float32, 'exact'), (torch.bfloat16, 'precision')):
        m = load_model(tmp_path/'lora', dtype=dt)
        assert same_weights(d.meta['fingerprints']['finetuned'], fingerprint(m)) == want, dt
        Directions.load(d.save(tmp_path/'d.safetensors'), model=m)   # accepted at either precision
    with pytest.raises(WeightwatchError, match='directions were computed for fine-tuned model'):
        Directions.load(tmp_path/'d.safetensors', model=load_model(tmp_path/'base'))

def _legacy_gpt2(src, dst):
    "Rewrite a GPT-2 checkpoint the way older files (e.g. the hub's `gpt2`) store it: no `transformer.` prefix, attention masks kept."
    import shutil
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    sd = {k.removeprefix('transformer.'): v for k, v in load_file(src/'model.safetensors').items()}
    n_layer, n_pos = (json.loads((src/'config.json').read_text())[k] for k in ('n_layer', 'n_positions'))
    sd.update({f'h.{l}.attn.bias': torch.tril(torch.ones(1, 1, n_pos, n_pos)) for l in range(n_layer)})
    save_file(sd, dst/'model.safetensors', metadata={'format': 'pt'})
    return dst

def test_older_gpt2_checkpoint_names(tmp_path):
    from weightwatch_nb.calibrate import calibrate
    b = make_tiny_checkpoint(tmp_path/'base', 'gpt2', n_layers=2)
    truth = plant_update(b, tmp_path/'ft', {(1, 'mlp_out'): 2})
    lb, lf = _legacy_gpt2(b, tmp_path/'lbase'), _legacy_gpt2(tmp_path/'ft', tmp_path/'lft')
    d = compute_directions(lb, lf, k=2, progress=False)          # directions from the files as stored
    assert subspace_cosines(d[(1, 'mlp_out')].T, truth[(1, 'mlp_out')]).min() >= 0.999
    model = load_model(lf)
    assert same_weights(fingerprint(lf), fingerprint(model)) == 'exact' and fingerprint(lf) == fingerprint(tmp_path/'ft')
    mon = calibrate(model, Directions.load(d.save(tmp_path/'d.safetensors'), model=model), [f'the model {i}' for i in range(12)])
    assert len(mon) == len(d)                                     # accepted by the loaded model: before, its fingerprint differed
    from peft import LoraConfig, get_peft_model                   # a LoRA adapter on the older-style base
    torch.manual_seed(0)
    pm = get_peft_model(load_hf(b)[0], LoraConfig(r=2, lora_alpha=4, target_modules=['c_proj', 'c_fc'], fan_in_fan_out=True))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if 'lora_B' in n: p.normal_(0, 0.1)
    pm.save_pretrained(tmp_path/'lora')
    dl = compute_directions(lb, lora=tmp_path/'lora', k=2, progress=False)
    assert dl.meta['fingerprints']['finetuned'] == fingerprint(pm.merge_and_unload())

def test_older_rotary_tables_are_not_weights(tmp_path):
    "Older Pythia (GPT-NeoX) files store each layer's rotary table and attention masks; the loaded model computes them."
    from safetensors.torch import load_file, save_file
    b = make_tiny_checkpoint(tmp_path/'base', 'gpt_neox', n_layers=2)
    truth = plant_update(b, tmp_path/'ft', {(1, 'mlp_out'): 2})
    want = fingerprint(tmp_path/'ft')
    for d in (b, tmp_path/'ft'):
        sd = load_file(d/'model.safetensors')
        for l in range(2):
            a = f'gpt_neox.layers.{l}.attention'
            sd.update({f'{a}.rotary_emb.inv_freq': torch.rand(4), f'{a}.bias': torch.ones(1, 1, 8, 8, dtype=torch.bool),
                       f'{a}.masked_bias': torch.tensor(-1e9)})
        save_file(sd, d/'model.safetensors', metadata={'format': 'pt'})
    assert fingerprint(tmp_path/'ft') == want
    model = load_model(tmp_path/'ft')
    assert same_weights(fingerprint(tmp_path/'ft'), fingerprint(model)) == 'exact'
    d = compute_directions(b, tmp_path/'ft', k=2, progress=False)
    assert subspace_cosines(d[(1, 'mlp_out')].T, truth[(1, 'mlp_out')]).min() >= 0.999
    Directions.load(d.save(tmp_path/'d.safetensors'), model=model)   # accepted by the loaded model

def test_neox_unembedding_in_files_and_loaded_models(tmp_path):
    "GPT-NeoX files store the untied unembedding as `embed_out`; the loaded model calls it `lm_head`: both are found."
    from weightwatch_nb.edit import removed_weights
    b = tiny('gpt_neox', tmp_path/'base')
    assert not json.loads((b/'config.json').read_text()).get('tie_word_embeddings')
    truth = plant_update(b, tmp_path/'ft', {(1, 'unembed'): 2, (1, 'mlp_out'): 1})
    (hb, _), (hf, _) = load_hf(b), load_hf(tmp_path/'ft')
    assert 'lm_head.weight' in hf.state_dict()
    for d in (compute_directions(b, tmp_path/'ft', k=2, matrices=['unembed'], progress=False),
              compute_directions(hb, hf, k=2, matrices=['unembed'], progress=False)):
        assert subspace_cosines(d[(1, 'unembed')].T, truth[(1, 'unembed')]).min() >= 0.999
    w = removed_weights(b, tmp_path/'ft', 2, matrices=['unembed', 'mlp_out'], like=load_model(tmp_path/'ft'), progress=False)
    assert torch.allclose(w['lm_head.weight'], hb.state_dict()['lm_head.weight'], atol=1e-5)   # the planted update, and only it, removed

ARCH_KW = {'gptj': dict(n_embd=64, n_inner=128, n_layer=2, n_head=4, n_positions=128, rotary_dim=8),   # GPT-J's own config names
           'codegen': dict(n_embd=64, n_inner=128, n_layer=2, n_head=8, n_positions=128, n_ctx=128, rotary_dim=4),   # (and CodeGen's: q, v, k fused in four groups of heads)
           'gpt_neox': dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)}   # no grouped-query attention
_MOE_KW = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               max_position_embeddings=128, num_experts_per_tok=2)
ARCH_KW |= {'mixtral': _MOE_KW | dict(num_local_experts=3), 'olmoe': _MOE_KW | dict(num_experts=3), 'flex_olmo': _MOE_KW | dict(num_experts=3),   # (FlexOlmo: OLMoE's experts, OLMo 2's norms)
            'qwen3_moe': _MOE_KW | dict(num_experts=3, moe_intermediate_size=96),   # Qwen3-MoE's experts are narrower than its `intermediate_size`
            'qwen2_moe': _MOE_KW | dict(num_experts=3, moe_intermediate_size=96, shared_expert_intermediate_size=80),   # and a shared expert
            'glm4_moe': _MOE_KW | dict(n_routed_experts=3, moe_intermediate_size=96, n_shared_experts=1, first_k_dense_replace=0, n_group=1, topk_group=1),
            'deepseek_v2': _MOE_KW | dict(n_routed_experts=3, moe_intermediate_size=96, n_shared_experts=1, first_k_dense_replace=0, n_group=1, topk_group=1,
                                          q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)}   # latent attention
ARCH_KW['gpt_oss'] = _MOE_KW | dict(num_local_experts=3)   # experts stored [experts, in, out], gate and up interleaved
ARCH_KW['minimax_m2'] = _MOE_KW | dict(num_local_experts=3)   # Mixtral's layout, a sigmoid router with a score-correction bias
ARCH_KW |= {t: _MOE_KW | dict(num_local_experts=3) for t in ('phimoe', 'granitemoe')}
ARCH_KW['llama4_text'] = _MOE_KW | dict(num_local_experts=3, intermediate_size=96, intermediate_size_mlp=128, interleave_moe_layer_step=1)   # experts [experts, in, out], gate and up chunked; a shared expert   # Mixtral's stored layout (PhiMoE), fused under its own names (GraniteMoE)
ARCH_KW['granitemoehybrid'] = {k: v for k, v in _MOE_KW.items() if k != 'head_dim'} | dict(   # Granite 4.0-H: a Mamba-2 block, then an attention block;
    intermediate_size=96, shared_intermediate_size=48, num_local_experts=3, layer_types=['mamba', 'attention'], mamba_n_heads=4,   # GraniteMoE's experts and
    mamba_d_state=16, mamba_chunk_size=16, position_embedding_type='rope', residual_multiplier=0.5, embedding_multiplier=2.0,    # an MLP beside them in both
    logits_scaling=2.0, attention_multiplier=0.25)
ARCH_KW['nemotron_h'] = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,   # Nemotron-H:
    hybrid_override_pattern='M-*-', mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16, n_groups=1, chunk_size=16, tie_word_embeddings=False)   # Mamba, MLP, attention, MLP
ARCH_KW['bamba'] = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,   # Bamba: Mamba,
                        attn_layer_indices=[1], mamba_n_heads=4, mamba_d_state=16, mamba_chunk_size=16, tie_word_embeddings=False)   # then attention
ARCH_KW['jamba'] = _MOE_KW | dict(num_experts=3, expert_layer_period=1, expert_layer_offset=0, attn_layer_period=2, attn_layer_offset=1, mamba_d_state=8,   # Jamba: Mamba, then
                                  tie_word_embeddings=False)   # attention; experts in both
ARCH_KW['lfm2'] = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,   # LFM2: a
                       layer_types=['conv', 'full_attention'], block_multiple_of=16, tie_word_embeddings=False)   # convolution block, then attention; its MLP 2/3 as wide as configured (128)
ARCH_KW['lfm2_moe'] = _MOE_KW | dict(num_experts=3, moe_intermediate_size=96, num_dense_layers=0, layer_types=['conv', 'full_attention'], tie_word_embeddings=False)   # LFM2-MoE
ARCH_KW['afmoe'] = _MOE_KW | dict(num_experts=3, moe_intermediate_size=96, num_shared_experts=1, num_dense_layers=0, global_attn_every_n_layers=2, sliding_window=4,   # AFMoE:
                                  tie_word_embeddings=False)   # sandwich norms, GLM-4-MoE's experts and shared expert
ARCH_KW['ernie4_5_moe'] = _MOE_KW | dict(moe_num_experts=3, moe_k=2, moe_intermediate_size=96, moe_num_shared_experts=1, moe_layer_start_index=0)   # GLM-4-MoE's names
_HYBRID_KW = dict(layer_types=['linear_attention', 'full_attention'], linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8)
ARCH_KW |= {'qwen3_5_text': {k: v for k, v in _MOE_KW.items() if k != 'num_experts_per_tok'} | _HYBRID_KW,   # block 0: linear attention; block 1: gated full attention
            **{t: ARCH_KW['qwen2_moe'] | _HYBRID_KW for t in ('qwen3_next', 'qwen3_5_moe_text')}}   # and Qwen2-MoE's experts and shared expert
ARCH_KW['deepseek_v3'] = ARCH_KW['deepseek_v2'] | dict(num_key_value_heads=4, head_dim=8)   # (its rotary key is shared by every head; head_dim: the rotary part)
ARCH_KW['glm4_moe_lite'] = {k: v for k, v in ARCH_KW['deepseek_v3'].items() if k not in ('first_k_dense_replace', 'head_dim')} | dict(mlp_layer_types=['sparse', 'sparse'])   # GLM-4.7-Flash: V3's attention, dense blocks by `mlp_layer_types`
ARCH_KW['glm_moe_dsa'] = ARCH_KW['glm4_moe_lite'] | dict(q_lora_rank=32, index_topk=4, index_head_dim=16, index_n_heads=2)   # GLM-5: and a sparse-attention indexer (not mapped)
ARCH_KW['laguna'] = _MOE_KW | dict(num_experts=3, moe_intermediate_size=96, shared_expert_intermediate_size=80, mlp_layer_types=['sparse', 'sparse'])   # Laguna: GLM-4-MoE's
# names (stored as Qwen2-MoE's), dense blocks by `mlp_layer_types`, a gate on each attention head's output (`g_proj`, not mapped)
ARCH_KW |= {'mamba': dict(hidden_size=64, num_hidden_layers=2, state_size=8, expand=2, time_step_rank=8),   # state-space models: a Mamba mixer in each block
            'mamba2': dict(hidden_size=64, num_hidden_layers=2, state_size=8, expand=2, num_heads=8, head_dim=16, n_groups=1, chunk_size=8),
            'falcon_mamba': dict(hidden_size=64, num_hidden_layers=2, state_size=8, expand=2, time_step_rank=8)}
ARCH_KW['youtu'] = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,   # Youtu-LLM: DeepSeek-V3's
                       q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)   # latent attention, Llama's MLP in every block
_OLD = dict(max_position_embeddings=128)   # the older families, under their own config names
ARCH_KW |= {'opt': _OLD | dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64),
            'xglm': _OLD | dict(d_model=64, ffn_dim=128, num_layers=2, attention_heads=4),
            'gpt_neo': _OLD | dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, attention_types=[[['global', 'local'], 1]], window_size=4),
            'gpt_bigcode': dict(n_embd=64, n_inner=128, n_layer=2, n_head=4, n_positions=128),
            'mpt': dict(d_model=64, n_layers=2, n_heads=4, max_seq_len=128),
            'bloom': dict(hidden_size=64, n_layer=2, n_head=4, tie_word_embeddings=False),
            'falcon': _OLD | dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, multi_query=True, parallel_attn=True,
                                  new_decoder_architecture=False, tie_word_embeddings=False),   # Falcon-7B's layout   # (untied: a tiny tied model repeats its input token, plant or not)
            'vaultgemma': {k: v for k, v in _MOE_KW.items() if k != 'num_experts_per_tok'} | dict(tie_word_embeddings=False)}
ARCH_KW['gemma4_text'] = dict(   # Gemma 4: per-block head sizes (full attention: 32, its keys its values too), blocks 2 and 3 reuse the keys and values of
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,   # earlier blocks and have
    global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True, layer_types=['sliding_attention', 'full_attention'] * 2, sliding_window=4,   # an MLP twice as wide,
    num_kv_shared_layers=2, use_double_wide_mlp=True, hidden_size_per_layer_input=8, vocab_size_per_layer_input=300)   # and per-layer inputs (not mapped)
OLDER = ['ministral3', 'vaultgemma', 'ernie4_5', 'nanochat', 'jais2', 'qwen3_5_text', 'opt', 'xglm', 'gpt_neo', 'gpt_bigcode', 'mpt', 'bloom']   # mapped in session 26 (Llama's names, or their own)
VARIANTS = {'stablelm_parallel': ('stablelm', dict(use_parallel_residual=True)),   # attention and the MLP side by side on one norm
            'gemma3_narrow': ('gemma3_text', dict(num_attention_heads=2, num_key_value_heads=1)),   # heads × head_dim = 32 < d_model (Gemma 2 2B, Gemma 3 1B)
            'glm4_moe_narrow': ('glm4_moe', dict(moe_intermediate_size=32)),       # a shared expert narrower than d_model (GLM-4.5, DeepSeek-V3)
            'qwen3_moe_dense': ('qwen3_moe', dict(mlp_only_layers=[0])),           # mixtures of experts whose block 0 has a dense MLP
            'qwen2_moe_dense': ('qwen2_moe', dict(decoder_sparse_step=2)),
            'glm4_moe_dense': ('glm4_moe', dict(first_k_dense_replace=1)),
            'ernie4_5_moe_dense': ('ernie4_5_moe', dict(moe_layer_start_index=1)),
            'deepseek_v2_dense': ('deepseek_v2', dict(first_k_dense_replace=1, q_lora_rank=32)),   # (and its query through a latent too)
            'deepseek_v3_dense': ('deepseek_v3', dict(first_k_dense_replace=1, q_lora_rank=32)),
            'glm4_moe_lite_dense': ('glm4_moe_lite', dict(mlp_layer_types=['dense', 'sparse'], q_lora_rank=32)),   # (GLM-4.7-Flash's own layout)
            'glm_moe_dsa_dense': ('glm_moe_dsa', dict(mlp_layer_types=['dense', 'sparse'])),
            'llama4_text_dense': ('llama4_text', dict(interleave_moe_layer_step=2)),
            'gemma4_moe': ('gemma4_text', dict(enable_moe_block=True, num_experts=3, top_k_experts=2, moe_intermediate_size=32,   # (Gemma 4 26B A4B: experts beside
                                               hidden_size_per_layer_input=0, num_kv_shared_layers=0)),   # the MLP; no per-layer inputs, no shared keys)
            'granitemoehybrid_dense': ('granitemoehybrid', dict(num_local_experts=0)),
            'jamba_dense': ('jamba', dict(expert_layer_period=2, expert_layer_offset=1, attn_layer_offset=0)),
            'afmoe_dense': ('afmoe', dict(num_dense_layers=1)),
            'lfm2_moe_dense': ('lfm2_moe', dict(num_dense_layers=1, layer_types=['full_attention', 'conv'])),   # (its first `num_dense_layers` blocks dense)   # (attention, then Mamba; a dense MLP, then experts)   # (Granite 4.0-H Micro: no experts, the MLP alone)
            'laguna_dense': ('laguna', dict(mlp_layer_types=['dense', 'sparse'])),
            'youtu_q': ('youtu', dict(q_lora_rank=None)),   # (the query straight from the stream, `q_proj`)
            'falcon_sequential': ('falcon', dict(parallel_attn=False))}   # (attention, then the MLP on a norm of its own)   # (Llama 4 Maverick: experts every other block)

def _ffn(layer):
    "A decoder layer's MLP or mixture of experts: `mlp`, GraniteMoE's `block_sparse_moe`, Llama 4's `feed_forward`."
    return getattr(layer, 'block_sparse_moe', None) or getattr(layer, 'feed_forward', None) or layer.mlp

def _config(arch):
    "A tiny config of `arch`, or of one of the `VARIANTS`."
    import transformers as T
    arch, extra = VARIANTS.get(arch, (arch, {}))
    kw = (ARCH_KW.get(arch) or dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    head_dim=16, max_position_embeddings=128)) | extra
    return T.AutoConfig.for_model(arch, vocab_size=300, bos_token_id=1, eos_token_id=2, pad_token_id=0, **kw)

def _plain_pair(arch, tmp_path, plant):
    "A tiny pair of a Hugging Face architecture (norm gains randomised) with `plant` rank-1 updates; returns base, fine-tuned, truth."
    import transformers as T
    from weightwatch_nb.core import tiny_tokenizer
    torch.manual_seed(0)
    m = T.AutoModelForCausalLM.from_config(_config(arch))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if 'norm' in n or 'ln_' in n: p.add_(0.5 * torch.randn_like(p))
            if n.endswith('router.gate.weight') and not p.any(): p.normal_(0, 0.1)   # (AFMoE starts its router at zero: every pick a tie, which any rounding flips)
    m.save_pretrained(tmp_path/'base'); tiny_tokenizer(300).save_pretrained(tmp_path/'base')
    return tmp_path/'base', tmp_path/'ft', plant_update(tmp_path/'base', tmp_path/'ft', plant, scale=5.)

def _post_norm_pair(arch, tmp_path):
    "A tiny Gemma 2, Gemma 3, OLMo 2 or 3, FlexOlmo, EXAONE 4 or GLM-4 pair (norm gains randomised, so a norm in the way shows): planted rank-1 updates of `attn_out` at layer 0, reads at layer 1."
    b, f, truth = _plain_pair(arch, tmp_path, {(0, 'attn_out'): 1, (1, 'attn_q'): 1, (1, 'mlp_in'): 1})
    return b, f, truth[(0, 'attn_out')][:, 0]

@pytest.mark.parametrize('arch', ['gemma2', 'gemma3_text', 'gemma4_text', 'olmo2', 'olmo3', 'flex_olmo', 'exaone4', 'glm4', 'afmoe'])
def test_post_norm_directions_compared_before_the_norm(arch, tmp_path):
    "Where a norm follows attention and the MLP, directions are compared at their outputs, where a planted update is exactly along them."
    from weightwatch_nb.directions import WRITE_HOOK, DEFAULT_HOOK, READ_HOOK
    from weightwatch_nb.calibrate import calibrate
    from weightwatch_nb.steer import project_out
    b, f, u = _post_norm_pair(arch, tmp_path)
    d = compute_directions(b, f, k=1, layers=[0], progress=False)
    assert d.hook_point == WRITE_HOOK and d.hook(0, 'attn_out') == 'blocks.0.attn.hook_out'
    assert abs(float(d[(0, 'attn_out')][0] @ u)) > 0.999
    h, acts = d.hook(0, 'attn_out'), {}
    ids = torch.tensor([[1, 5, 9, 13, 200, 7]])
    for which, src in (('base', b), ('ft', f)):
        _, cache = load_model(src).run_with_cache(ids, names_filter=lambda n: n in (h, 'blocks.0.hook_out'))
        acts[which] = cache
    for hook, exact in ((h, True), ('blocks.0.hook_out', False)):   # the change the update makes, along its direction: all of it only before the norm
        D = (acts['ft'][hook] - acts['base'][hook])[0]
        share = float(((D @ u) ** 2).sum() / (D ** 2).sum())
        assert (share > 0.999) == exact, (hook, share)
    with pytest.warns(UserWarning, match='normalises each attention and MLP output'):
        compute_directions(b, f, k=1, layers=[0], hook_point=DEFAULT_HOOK, progress=False)
    model = load_model(f)
    mon = calibrate(model, d, [f'the model {i} of {j}' for i in range(6) for j in range(4)])
    assert len(mon) == len(d)                                            # calibrated at the sub-layer outputs
    x = model.tokenizer('the model 3 of 2', return_tensors='pt').input_ids
    with project_out(model, d):
        _, cache = model.run_with_cache(x, names_filter=lambda n: n == h)
    assert float((cache[h][0] @ d[(0, 'attn_out')].T).abs().max()) < 1e-4   # removed where it was measured
    # the read side is compared with exactly what each reading matrix multiplies: a norm's output, or on OLMo 2 and 3 and EXAONE 4 (no norm in front)
    # the residual stream (GLM-4: what its MLP reads, since the bridge splits gate_up_proj into copies)
    rd = compute_directions(b, f, k=1, matrices=['attn_q', 'mlp_in'], layers=[1], hook_point=READ_HOOK, progress=False)
    layer, seen = model.original_model.model.layers[1], {}
    hs = [layer.self_attn.q_proj.register_forward_hook(lambda mod, i, o: seen.__setitem__('attn_q', i[0].detach())),
          getattr(layer.mlp, 'up_proj', layer.mlp).register_forward_hook(lambda mod, i, o: seen.__setitem__('mlp_in', i[0].detach()))]
    try: _, cache = model.run_with_cache(x, names_filter=lambda n: n in (rd.hook(1, 'attn_q'), rd.hook(1, 'mlp_in')))
    finally:
        for hk in hs: hk.remove()
    for m in ('attn_q', 'mlp_in'): assert torch.equal(cache[rd.hook(1, m)], seen[m]), (arch, m, rd.hook(1, m))
    assert (rd.hook(1, 'attn_q'), rd.hook(1, 'mlp_in')) == (('blocks.1.hook_in', 'blocks.1.hook_resid_mid') if arch in ('olmo2', 'olmo3', 'flex_olmo', 'exaone4') else
                                                          ('blocks.1.ln1.hook_out', 'blocks.1.ln2.hook_out'))
    assert len(calibrate(model, rd, [f'the model {i} of {j}' for i in range(6) for j in range(4)])) == len(rd)
    from weightwatch_nb.directions import RAW_READ_HOOK   # either read template means "what each matrix reads", on either kind of block
    assert compute_directions(b, f, k=1, matrices=['attn_q'], layers=[1], hook_point=RAW_READ_HOOK, progress=False).hook(1, 'attn_q') == rd.hook(1, 'attn_q')

def test_edit_that_does_not_read_back_writes_nothing(tmp_path, monkeypatch):
    "A saved edit whose checkpoint does not read back as the edited model is refused, not half-written; a mixture of experts (stored expert by expert, loaded fused) reads back."
    import transformers as T
    import weightwatch_nb.edit as E
    from weightwatch_nb.core import tiny_tokenizer
    from weightwatch_nb.edit import interpolate, save_edited
    torch.manual_seed(0)
    cfg = T.AutoConfig.for_model('mixtral', vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1, max_position_embeddings=64)
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path/'moe'); tiny_tokenizer(300).save_pretrained(tmp_path/'moe')
    m = interpolate(tmp_path/'moe', tmp_path/'moe', 0.5, progress=False)
    real = E.fingerprint
    monkeypatch.setattr(E, 'fingerprint', lambda x: {'sha256': 'another model'} if isinstance(x, Path) else real(x))   # what a layout not mapped reads back as
    with pytest.raises(WeightwatchError, match='cannot verify the saved checkpoint, so nothing was written'):
        save_edited(m, None, tmp_path/'out')
    assert not (tmp_path/'out').exists() and sorted(p.name for p in tmp_path.iterdir()) == ['moe']
    monkeypatch.undo()
    out = save_edited(m, None, tmp_path/'out')
    assert same_weights(fingerprint(m), fingerprint(out)) == 'exact' and same_weights(fingerprint(load_model(out)), fingerprint(out)) == 'exact'

def test_lora_on_modules_no_matrix_maps_warns(tmp_path):
    "A LoRA update on a module no matrix maps to is named in a warning, not dropped silently."
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    b = tiny('gpt_neox', tmp_path/'base')
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM        # (this tiny checkpoint has no tokenizer, which `load_hf` would load)
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(b), LoraConfig(r=2, lora_alpha=4, target_modules=['dense_h_to_4h', 'dense_4h_to_h']))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if 'lora_B' in n: p.normal_(0, 0.1)
    pm.save_pretrained(tmp_path/'lora')
    f = tmp_path/'lora'/'adapter_model.safetensors'       # as an adapter on a module this architecture has no matrix for would store it
    save_file({k.replace('dense_h_to_4h', 'extra_proj'): v for k, v in load_file(f).items()}, f)
    with pytest.warns(UserWarning, match=r"changes 2 module\(s\) that no gpt_neox matrix maps to \(e.g. \['base_model.model.gpt_neox.layers.0.mlp.extra_proj"):
        d = compute_directions(b, lora=tmp_path/'lora', k=2, progress=False)
    assert d.matrices == ['mlp_out']                      # the mapped update is still there

@pytest.mark.parametrize('arch', ['llama', 'phi3', 'glm', 'glm4', 'arcee', 'nemotron', 'apertus', 'starcoder2', 'cohere', 'gpt_neox'])
def test_mlp_matrices_are_what_the_mlp_computes(arch, tmp_path):
    "`mlp_gate`, `mlp_in` and `mlp_out`, as `orient` reads them, rebuild what the model's MLP computes: down(act(gate) * up), or down(act(up)) without a gate."
    from transformers import AutoModelForCausalLM
    b = make_tiny_checkpoint(tmp_path/'base', 'llama') if arch == 'llama' else tiny(arch, tmp_path/'base')
    hf = AutoModelForCausalLM.from_pretrained(b)
    info = arch_info(json.loads((b/'config.json').read_text()))
    params, mods = dict(hf.named_parameters()), dict(hf.named_modules())
    def weight(m):   # the stored weight of matrix m at layer 0, and the bias beside it (if any)
        key = next(k for k in params if k.endswith(info['specs'][m].key.format(layer=0)))
        bias = params.get(key.removesuffix('weight') + 'bias') if info['specs'][m].part is None else None
        return orient(params[key], info['specs'][m], info, m), bias
    mlp = mods[next(k for k in mods if k.endswith('layers.0.mlp'))]
    act = next(getattr(mlp, a) for a in ('act_fn', 'activation_fn', 'act') if hasattr(mlp, a))
    x = torch.randn(2, 5, info['d_model'])
    with torch.no_grad():
        (Wi, bi), (Wo, bo) = weight('mlp_in'), weight('mlp_out')   # [d_model, d_mlp] each: read side x @ W, write side h @ W.T
        up = x @ Wi + (0 if bi is None else bi)
        h = act(x @ weight('mlp_gate')[0]) * up if 'mlp_gate' in info['specs'] else act(up)
        assert torch.allclose(h @ Wo.T + (0 if bo is None else bo), mlp(x), atol=1e-5)

BRIDGE_SITES = {'attn_q': 'attn.q', 'attn_k': 'attn.k', 'attn_v': 'attn.v', 'attn_out': 'attn.o', 'mlp_in': 'mlp.in', 'mlp_gate': 'mlp.gate', 'mlp_out': 'mlp.out'}

@pytest.mark.parametrize('arch', [*OLDER, 'gpt_neox', 'phi3', 'gemma4_text', 'falcon', 'falcon_sequential', 'seed_oss', 'codegen'])
def test_matrices_are_what_the_bridge_computes(arch, tmp_path):
    "Each block matrix, as `orient` reads it, is what the TransformerLens bridge (whose logits equal Hugging Face's) multiplies at that site: its output minus input @ matrix is the same for every token (the bias), also where q, k and v are fused."
    from weightwatch_nb.core import hf_state_dict
    b, _, _ = _plain_pair(arch, tmp_path, {(0, 'attn_out'): 1})
    model, info = load_model(b), arch_info(_config(arch))
    sd, ids = hf_state_dict(model), torch.tensor([[1, 5, 9, 13, 200, 7, 42, 3]])
    assert torch.allclose(model(ids), load_hf(b)[0](ids).logits, atol=1e-4)        # the bridge computes what Hugging Face does
    sites = {m: s for m, s in BRIDGE_SITES.items() if m in info['specs']}
    _, cache = model.run_with_cache(ids, names_filter=lambda n: any(n in (f'blocks.1.{s}.hook_in', f'blocks.1.{s}.hook_out') for s in sites.values()))
    for (l, m), (key, spec) in find_keys(list(sd), info, list(sites), layers=[1]).items():
        W = orient(sd[key], spec, info, key)                                        # [d_model, d_in]
        x, y = (cache[f'blocks.1.{sites[m]}.{h}'].reshape(ids.shape[1], -1) for h in ('hook_in', 'hook_out'))
        bias = y - (x @ W if spec.residual == 'in' else x @ W.T)
        assert y.abs().max() > 1e-3 and torch.allclose(bias, bias[:1].expand_as(bias), atol=1e-4), (arch, m)

def test_neox_qkv_rows_are_what_attention_computes(tmp_path):
    "GPT-NeoX keeps q, k and v in one matrix, interleaved head by head: `orient` picks exactly the rows its attention uses as each."
    from transformers import AutoModelForCausalLM
    b = tiny('gpt_neox', tmp_path/'base')
    hf = AutoModelForCausalLM.from_pretrained(b)
    info = arch_info(json.loads((b/'config.json').read_text()))
    att = hf.gpt_neox.layers[0].attention
    x = torch.randn(2, 5, 64)
    with torch.no_grad():   # as GPTNeoXAttention.forward splits its output: view as [head, 3 * head_size], then q | k | v in each head
        qkv = att.query_key_value(x).view(2, 5, -1, 3 * att.head_size).chunk(3, dim=-1)
        for i, m in enumerate(('attn_q', 'attn_k', 'attn_v')):
            W = orient(att.query_key_value.weight, info['specs'][m], info, m)        # [d_model, d_in]
            bias = att.query_key_value.bias.view(-1, 3 * att.head_size).chunk(3, dim=-1)[i].reshape(-1)
            assert torch.allclose((x @ W + bias).view(2, 5, -1, att.head_size), qkv[i], atol=1e-5), m
        W, spec = att.query_key_value.weight.clone(), info['specs']['attn_k']
        put_oriented(W, spec, info, torch.zeros(64, 64))                             # writing one part: only its rows change
        assert torch.equal(orient(W, spec, info), torch.zeros(64, 64))
        for m in ('attn_q', 'attn_v'): assert torch.equal(orient(W, info['specs'][m], info), orient(att.query_key_value.weight, info['specs'][m], info))

def test_codegen_qkv_rows_are_what_attention_computes(tmp_path):
    "CodeGen keeps q, v and k in one matrix, in four groups of heads (q, v, k in each): `orient` picks exactly the rows its attention splits off as each."
    import transformers as T
    info = arch_info(_config('codegen'))
    att = T.AutoModelForCausalLM.from_config(_config('codegen')).transformer.h[0].attn
    x = torch.randn(2, 5, 64)
    with torch.no_grad():   # as CodeGenAttention.forward splits its output: four groups, then query | value | key in each
        q, v, k = torch.split(att.qkv_proj(x).reshape(2, 5, 4, -1), info['q'] // 4, dim=-1)
        for m, want in (('attn_q', q), ('attn_v', v), ('attn_k', k)):
            assert torch.allclose(x @ orient(att.qkv_proj.weight, info['specs'][m], info, m), want.reshape(2, 5, -1), atol=1e-5), m
        W = att.qkv_proj.weight.clone()
        put_oriented(W, info['specs']['attn_v'], info, torch.zeros(64, 64))   # writing one part: only its rows change
        assert torch.equal(orient(W, info['specs']['attn_v'], info), torch.zeros(64, 64))
        for m in ('attn_q', 'attn_k'): assert torch.equal(orient(W, info['specs'][m], info), orient(att.qkv_proj.weight, info['specs'][m], info))

def _lora_matches_merged(b, hf, tmp_path, ms, k, **cfg):
    "A LoRA adapter (`cfg`, random B so that ΔW ≠ 0) on `hf`, the model of `b`: its directions of `ms`, read without merging, equal the merged model's."
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    pm = get_peft_model(hf, LoraConfig(**cfg))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if 'lora_B' in n: p.normal_(0, 0.1)
    pm.save_pretrained(tmp_path/'lora')
    merged = pm.merge_and_unload()
    dl = compute_directions(b, lora=tmp_path/'lora', k=k, matrices=ms, progress=False)
    dm = compute_directions(b, merged, k=k, matrices=ms, method='exact', progress=False)
    assert dl.names() == dm.names() and len(dl) == k * len(ms) * 2              # (two blocks)
    for key in dl.vectors: assert torch.allclose(dl.vectors[key], dm.vectors[key], atol=1e-4), key

def test_neox_lora_on_fused_qkv_equals_merged(tmp_path):
    "A LoRA adapter on GPT-NeoX's query_key_value: q, k and v each get their own interleaved rows of the update."
    b, _, _ = _plain_pair('gpt_neox', tmp_path, {(0, 'attn_out'): 1})
    _lora_matches_merged(b, load_hf(b)[0], tmp_path, ['attn_q', 'attn_k', 'attn_v'], 3, r=3, lora_alpha=6, target_modules=['query_key_value'])

@pytest.mark.filterwarnings("ignore:directions of")   # (read and write matrices together: only their equality is tested)
@pytest.mark.parametrize('arch,targets,ms', [('bloom', ['query_key_value', 'dense_h_to_4h'], ['attn_q', 'attn_k', 'attn_v', 'mlp_in']),
                                             ('falcon', ['query_key_value', 'dense_4h_to_h'], ['attn_q', 'attn_k', 'attn_v', 'mlp_out']),
                                             ('mpt', ['Wqkv', 'down_proj'], ['attn_q', 'attn_k', 'attn_v', 'mlp_out']),
                                             ('gpt_bigcode', ['c_attn', 'c_fc'], ['attn_q', 'attn_k', 'attn_v', 'mlp_in']),
                                             ('opt', ['k_proj', 'fc1', 'out_proj'], ['attn_k', 'mlp_in', 'attn_out'])])
def test_lora_on_older_families_equals_merged(arch, targets, ms, tmp_path):
    "A LoRA adapter on BLOOM's query_key_value (head by head), MPT's Wqkv, GPT-BigCode's multi-query c_attn, or OPT's fc1 in the block: directions equal the merged model's."
    import transformers as T
    b, _, _ = _plain_pair(arch, tmp_path, {(0, 'attn_out'): 1})
    _lora_matches_merged(b, T.AutoModelForCausalLM.from_pretrained(b), tmp_path, ms, 2, r=2, lora_alpha=4, target_modules=targets)

def test_layouts_not_mapped_are_refused():
    "OPT-350m (norm after each block, projected embeddings), GPT-BigCode without multi-query and Falcons other than Falcon-7B's layout are refused with what to use instead."
    from weightwatch_nb.core import WeightwatchError
    opt = _config('opt').to_dict()
    for bad in (dict(do_layer_norm_before=False), dict(word_embed_proj_dim=32)):
        with pytest.raises(WeightwatchError, match="OPT-350m's layout.*use another OPT size"): arch_info(opt | bad)
    with pytest.raises(WeightwatchError, match=r"multi_query=False.*StarCoder and SantaCoder \(multi_query=True\) are mapped"):
        arch_info(_config('gpt_bigcode').to_dict() | dict(multi_query=False))
    falcon = _config('falcon').to_dict()
    for bad, why in ((dict(new_decoder_architecture=True, num_kv_heads=2), 'Falcon-40B and -180B'), (dict(alibi=True), 'ALiBi'), (dict(multi_query=False), 'one key and value head per query head')):
        with pytest.raises(WeightwatchError, match=f"not Falcon-7B's layout.*{why}"): arch_info(falcon | bad)
    assert arch_info(opt)['d_mlp'] == 128 and arch_info(_config('gpt_bigcode'))['kv'] == 16 and arch_info(falcon)['kv'] == 16   # (ffn_dim; one key and value head)

def _planted_found(truth, *ds):
    "Each planted update's directions are in whichever of the `Directions` `ds` has its (layer, matrix)."
    for d in ds:
        for key, U in truth.items():
            if key in d.vectors: assert subspace_cosines(d[key].T, U).min() >= 0.999, key

def _switched_and_edited_give_base(model, b, f, mon, ms, ids):
    "`ClipWeights` with every token switched, and the weights without `ms`'s rank-1 updates, both give the base model (and the fine-tune does not)."
    from weightwatch_nb.steer import steering, swapped_weights, _AllOn as AllOn
    from weightwatch_nb.edit import removed_weights, removed_update
    upd, edit = removed_update(b, f, 1, matrices=ms, like=model, progress=False), removed_weights(b, f, 1, matrices=ms, like=model, progress=False)
    with torch.no_grad():
        base = load_model(b)(ids)
        with steering(model, AllOn(mon, upd)): on = model(ids)
        with swapped_weights(model, edit): edited = model(ids)
    assert (model(ids) - base).abs().max() > 1e-3 and torch.allclose(on, base, atol=1e-4) and torch.allclose(edited, base, atol=1e-4)

@pytest.mark.filterwarnings("ignore:this (qwen3_5_moe_text|qwen3_next) model has a shared expert", "ignore:directions of")
@pytest.mark.parametrize('arch', ['qwen3_5_text', 'qwen3_5_moe_text', 'qwen3_next'])
def test_linear_attention_queries_keys_values(arch, tmp_path):
    "Linear-attention blocks read with one fused projection: Qwen3.5's `in_proj_qkv` (queries, keys, values, a block of rows each), Qwen3-Next's `in_proj_qkvz` (q, k, v and the gate z, key-head group by group). `orient` gives each as the block computes it, the read side is compared with exactly its input, planted updates are found, and steering and edits remove them."
    from weightwatch_nb.calibrate import calibrate
    from weightwatch_nb.directions import READ_HOOK
    b, f, truth = _plain_pair(arch, tmp_path, {(0, 'attn_q'): 1, (0, 'attn_k'): 1, (0, 'attn_v'): 1, (0, 'attn_out'): 1})
    info, hf = arch_info(_config(arch)), load_hf(b)[0]
    la, x = hf.model.layers[0].linear_attn, torch.randn(2, 5, 64)
    proj = la.in_proj_qkvz if arch == 'qwen3_next' else la.in_proj_qkv
    with torch.no_grad():   # the truth: the projection's output, split as the block splits it into q, k, v
        if arch == 'qwen3_next': q, k, v, _, _, _ = la.fix_query_key_value_ordering(proj(x), la.in_proj_ba(x))
        else: q, k, v = torch.split(proj(x), [la.key_dim, la.key_dim, la.value_dim], dim=-1)
        want = {m: t.reshape(2, 5, -1) for m, t in (('attn_q', q), ('attn_k', k), ('attn_v', v))}
        assert {m: t.shape[-1] for m, t in want.items()} == {'attn_q': info['lin_k'], 'attn_k': info['lin_k'], 'attn_v': info['lin_v']}
        for (l, m), (k, s) in find_keys(list(dict(hf.named_parameters())), info, ['attn_q', 'attn_k', 'attn_v'], layers=[0]).items():
            assert torch.allclose(x @ orient(dict(hf.named_parameters())[k], s, info, k), want[m], atol=1e-5), m
    d = compute_directions(b, f, k=1, matrices=['attn_q', 'attn_k', 'attn_v'], progress=False)
    assert set(d.vectors) == {(0, 'attn_q'), (0, 'attn_k'), (0, 'attn_v')} and d.hook_point == READ_HOOK
    for key in d.vectors: assert subspace_cosines(d[key].T, truth[key]).min() >= 0.999, key
    model, seen = load_model(f), {}
    la = model.original_model.model.layers[0].linear_attn
    h = getattr(la, 'in_proj_qkvz', None) or la.in_proj_qkv
    h = h.register_forward_hook(lambda mod, a, o: seen.__setitem__('in', a[0].detach()))
    ids = torch.tensor([[1, 5, 9, 13, 200, 7]])
    try: _, cache = model.run_with_cache(ids, names_filter=lambda n: n == d.hook(0, 'attn_q'))
    finally: h.remove()
    assert d.hook(0, 'attn_q') == 'blocks.0.ln1.hook_out' and torch.equal(cache['blocks.0.ln1.hook_out'], seen['in'])   # what in_proj_qkv reads
    ms = ['attn_q', 'attn_k', 'attn_v', 'attn_out']
    mon = calibrate(model, d, [f'the model {i} of {j}' for i in range(6) for j in range(5)], margin=0.1)
    _switched_and_edited_give_base(model, b, f, mon, ms, ids)

@pytest.mark.filterwarnings("ignore:this qwen3_next model has a shared expert")
def test_lora_on_qwen3_next_qkvz(tmp_path):
    "A LoRA adapter on Qwen3-Next's in_proj_qkvz (q, k, v and z interleaved by key-head group) and its full attention's q, k, v: each of q, k, v gets its own rows of the update, as in the merged model."
    import transformers as T
    b, _, _ = _plain_pair('qwen3_next', tmp_path, {(0, 'attn_out'): 1})
    _lora_matches_merged(b, T.AutoModelForCausalLM.from_pretrained(b), tmp_path, ['attn_q', 'attn_k', 'attn_v'], 2,
                         r=2, lora_alpha=4, target_modules=['in_proj_qkvz', 'q_proj', 'k_proj', 'v_proj'])

@pytest.mark.filterwarnings("ignore:directions of")
def test_lora_on_a_hybrid_of_linear_and_full_attention(tmp_path):
    "Qwen3.5: a LoRA adapter on the linear-attention blocks' in_proj_qkv and out_proj and the full-attention blocks' o_proj, q_proj (query and gate) and k_proj lands on each block's own matrices; the directions equal the merged model's."
    import transformers as T
    from peft import LoraConfig, get_peft_model
    b, _, _ = _plain_pair('qwen3_5_text', tmp_path, {(0, 'attn_out'): 1})
    torch.manual_seed(0)
    pm = get_peft_model(T.AutoModelForCausalLM.from_pretrained(b), LoraConfig(r=2, lora_alpha=4, target_modules=['in_proj_qkv', 'out_proj', 'o_proj', 'q_proj', 'k_proj']))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if 'lora_B' in n: p.normal_(0, 0.1)
    pm.save_pretrained(tmp_path/'lora')
    merged = pm.merge_and_unload()
    ms = ['attn_out', 'attn_q', 'attn_k', 'attn_v']
    dl = compute_directions(b, lora=tmp_path/'lora', k=2, matrices=ms, progress=False)
    dm = compute_directions(b, merged, k=2, matrices=ms, method='exact', progress=False)
    assert set(dl.vectors) == set(dm.vectors) == {(0, 'attn_out'), (0, 'attn_q'), (0, 'attn_k'), (0, 'attn_v'), (1, 'attn_out'), (1, 'attn_q'), (1, 'attn_k')}   # block 0: q, k, v from in_proj_qkv
    for key in dl.vectors: assert torch.allclose(dl.vectors[key], dm.vectors[key], atol=1e-4), key

@pytest.mark.filterwarnings("ignore:this glm4_moe model has a shared expert")
@pytest.mark.parametrize('arch,m', [('gemma3_narrow', 'attn_out'), ('glm4_moe_narrow', 'mlp_shared_out')])
def test_output_projections_narrower_than_d_model(arch, m, tmp_path):
    "An output projection that reads fewer units than d_model (o_proj of Gemma 2 2B and Gemma 3 1B, the shared expert of GLM-4.5 and DeepSeek-V3) is oriented whole: every row is the residual stream, from the checkpoint, from a LoRA adapter, and in edits."
    import transformers as T
    from peft import LoraConfig, get_peft_model
    from weightwatch_nb.edit import removed_weights
    from weightwatch_nb.core import hf_state_dict
    b, f, truth = _plain_pair(arch, tmp_path, {(0, m): 1, (1, 'mlp_out' if m == 'attn_out' else 'attn_out'): 1})
    info = arch_info(_config(arch))
    assert info[info['specs'][m].other] == 32 < info['d_model'] == 64
    d = compute_directions(b, f, k=1, matrices=[m], progress=False)
    assert d.vectors[(0, m)].shape == (1, 64) and subspace_cosines(d[(0, m)].T, truth[(0, m)]).min() >= 0.999
    edit, base = removed_weights(b, f, 1, matrices=[m], layers=[0], progress=False), hf_state_dict(load_hf(b)[0])
    assert len(edit) == 1 and all(torch.allclose(w, base[k], atol=1e-5) for k, w in edit.items())   # the plant removed from every row
    if m != 'attn_out': return   # (PEFT turns a target `down_proj` of this model into its fused experts, not its shared expert)
    torch.manual_seed(0)
    pm = get_peft_model(T.AutoModelForCausalLM.from_pretrained(b), LoraConfig(r=2, lora_alpha=4, target_modules=['o_proj']))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if 'lora_B' in n: p.normal_(0, 0.1)
    pm.save_pretrained(tmp_path/'lora')
    dl = compute_directions(b, lora=tmp_path/'lora', k=2, matrices=[m], progress=False)
    dm = compute_directions(b, pm.merge_and_unload(), k=2, matrices=[m], method='exact', progress=False)
    assert dl.names() == dm.names() and all(torch.allclose(dl.vectors[k], dm.vectors[k], atol=1e-4) for k in dl.vectors)

def _tiny_gemma3():
    "A tiny multimodal Gemma 3: a vision tower beside the language model."
    import transformers as T
    torch.manual_seed(0)
    cfg = T.Gemma3Config(text_config=dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, head_dim=16, max_position_embeddings=128),
                         vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14),
                         mm_tokens_per_image=4, image_token_index=299, boi_token_index=297, eoi_token_index=298)
    return T.Gemma3ForConditionalGeneration(cfg).eval()

def test_no_installs_across_threads():
    "Bridges booted in two threads at once, the first done before the second: TransformerLens's installer stays swapped out until the last is done, then is put back."
    import threading
    from transformer_lens.model_bridge.sources.transformers import helpers
    from weightwatch_nb.core import _no_installs
    orig, seen, a_in, a_out = helpers._ensure_torchvision, [], threading.Event(), threading.Event()
    def first():
        with _no_installs(): a_in.set(); a_out.wait(5)
    t = threading.Thread(target=first); t.start(); a_in.wait(5)
    with _no_installs():
        a_out.set(); t.join(5)
        seen.append(helpers._ensure_torchvision is not orig)   # the first thread is done, this one still boots
    assert seen == [True] and helpers._ensure_torchvision is orig

def test_multimodal_checkpoint_loads_without_installing_anything(tmp_path, monkeypatch):
    "A multimodal Gemma 3 checkpoint boots as a bridge without TransformerLens pip-installing torchvision (and a CUDA torch) for its image processor; its deltas are refused with what to use instead."
    import subprocess
    from weightwatch_nb.core import tiny_tokenizer, WeightwatchError
    hf = _tiny_gemma3(); hf.save_pretrained(tmp_path/'mm'); tiny_tokenizer(300).save_pretrained(tmp_path/'mm')
    started = []   # (recorded, not raised: TransformerLens swallows a failed install)
    def no(*a, **kw): started.append(a); raise OSError("no subprocess in this test")
    for f in ('check_call', 'run', 'Popen', 'call', 'check_output'): monkeypatch.setattr(subprocess, f, no)
    model, ids = load_model(tmp_path/'mm'), torch.tensor([[1, 5, 9, 13, 200]])
    assert started == []
    assert torch.allclose(model(ids), hf(input_ids=ids).logits, atol=1e-4)
    with pytest.raises(WeightwatchError, match="multimodal checkpoint .model_type .gemma3.*extract_language_model"): compute_directions(tmp_path/"mm", tmp_path/"mm", progress=False)

def test_extract_language_models_of_a_multimodal_pair(tmp_path, capsys):
    "`weightwatch extract-lm` on a multimodal Gemma 3 base and a fine-tune of its language model: the text-only pair's directions find the planted update, and the fine-tune's monitor runs."
    from weightwatch_nb.cli import main
    from weightwatch_nb.core import tiny_tokenizer
    hf = _tiny_gemma3(); hf.save_pretrained(tmp_path/'b'); tiny_tokenizer(300).save_pretrained(tmp_path/'b')
    u, v = torch.randn(64), torch.randn(64); u, v = u / u.norm(), v / v.norm()
    with torch.no_grad(): hf.get_decoder().layers[0].self_attn.o_proj.weight.add_(3 * torch.outer(u, v))   # the fine-tune: rank 1, language model only
    hf.save_pretrained(tmp_path/'f'); tiny_tokenizer(300).save_pretrained(tmp_path/'f')
    with pytest.raises(WeightwatchError, match="extract_language_model"): compute_directions(tmp_path/'b', tmp_path/'f', progress=False)
    for n in ('b', 'f'): assert main(['extract-lm', str(tmp_path/n), '-o', str(tmp_path/f'{n}_text')]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path/'b_text'), str(tmp_path/'f_text')]
    assert main(['extract-lm', str(tmp_path/'b'), '-o', str(tmp_path/'b_text')]) == 2 and 'exists' in capsys.readouterr().err
    d = compute_directions(tmp_path/'b_text', tmp_path/'f_text', k=2, progress=False)
    assert d.names() == ['L0.attn_out.u0'] and abs(float(d['L0.attn_out.u0'] @ u)) > 0.9999   # the planted update, and nothing else
    (tmp_path/'clean.jsonl').write_text('\n'.join(json.dumps({'text': f'the model {i} of {j}'}) for i in range(8) for j in range(5)) + '\n')
    d.save(tmp_path/'d.safetensors')
    assert main(['calibrate', str(tmp_path/'f_text'), str(tmp_path/'d.safetensors'), str(tmp_path/'clean.jsonl'), '-o', str(tmp_path/'m.safetensors'), '--quiet']) == 0
    assert main(['scan', str(tmp_path/'f_text'), str(tmp_path/'m.safetensors'), str(tmp_path/'clean.jsonl'), '--quiet']) == 0

def test_extract_language_model_of_a_lora_adapter_on_a_multimodal_base(tmp_path):
    "A LoRA adapter on a multimodal Gemma 3 (its language model's attention, and the vision tower's): the language model extracted from the adapter is the merged model's, and its deltas against the extracted base are the adapter's."
    from peft import LoraConfig, get_peft_model
    from weightwatch_nb.core import tiny_tokenizer, extract_language_model, hf_state_dict
    from weightwatch_nb.cli import main
    hf = _tiny_gemma3(); hf.save_pretrained(tmp_path/'b'); tiny_tokenizer(300).save_pretrained(tmp_path/'b')
    pm = get_peft_model(hf, LoraConfig(r=2, lora_alpha=4, target_modules=['q_proj', 'o_proj']))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if 'lora_B' in n: p.normal_(0, 0.1)
    pm.save_pretrained(tmp_path/'lora')
    merged = pm.merge_and_unload(); merged.save_pretrained(tmp_path/'merged'); tiny_tokenizer(300).save_pretrained(tmp_path/'merged')
    assert main(['extract-lm', str(tmp_path/'lora'), '-o', str(tmp_path/'lora_text'), '--base', str(tmp_path/'b')]) == 0
    for n in ('b', 'merged'): extract_language_model(tmp_path/n, tmp_path/f'{n}_text')
    got, want = hf_state_dict(load_hf(tmp_path/'lora_text')[0]), hf_state_dict(load_hf(tmp_path/'merged_text')[0])
    assert sorted(got) == sorted(want) and all(torch.allclose(got[k], want[k], atol=1e-6) for k in got)
    d = compute_directions(tmp_path/'b_text', tmp_path/'lora_text', k=2, matrices=['attn_out'], progress=False)
    assert [l for l, _ in d.vectors] == [0, 1]   # the adapter's o_proj update at both blocks

_TEXT = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
MULTIMODAL = {   # tiny multimodal checkpoints: (class, config kwargs, the text model type their language model is)
    'mistral3': ('Mistral3', dict(text_config=dict(model_type='mistral', **_TEXT), image_token_index=299, vision_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14, head_dim=16)), 'mistral'),
    'qwen3_5': ('Qwen3_5', dict(text_config=_TEXT | _HYBRID_KW, image_token_id=299, video_token_id=298, vision_config=dict(
        hidden_size=32, intermediate_size=64, depth=1, num_heads=2, out_hidden_size=64, patch_size=14)), 'qwen3_5_text'),
    'llama4': ('Llama4', dict(text_config=ARCH_KW['llama4_text'] | dict(vocab_size=300), image_token_index=299, vision_config=dict(   # (Llama 4 Scout and Maverick are released this way)
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14, vision_output_dim=32,
        projector_input_dim=32, projector_output_dim=64)), 'llama4_text'),
    'gemma4': ('Gemma4', dict(text_config=ARCH_KW['gemma4_text'] | dict(vocab_size=300), image_token_id=299, audio_config=None, vision_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=16, patch_size=14)), 'gemma4_text')}

@pytest.mark.parametrize('arch', list(MULTIMODAL))
def test_extract_language_model_of_other_multimodal_families(arch, tmp_path):
    "Mistral 3 (no causal LM to transformers) and Qwen3.5 (linear and full attention): the extracted language model is a mapped text-only model with the whole model's logits on text."
    import transformers as T
    from weightwatch_nb.core import tiny_tokenizer, extract_language_model
    name, kw, text_type = MULTIMODAL[arch]
    torch.manual_seed(0)
    hf = getattr(T, f'{name}ForConditionalGeneration')(getattr(T, f'{name}Config')(**kw)).eval()
    hf.save_pretrained(tmp_path/'mm'); tiny_tokenizer(300).save_pretrained(tmp_path/'mm')
    with pytest.raises(WeightwatchError, match=f"model_type '{text_type}' is mapped"): arch_info(json.loads((tmp_path/'mm'/'config.json').read_text()))
    out = extract_language_model(tmp_path/'mm', tmp_path/'text')
    assert arch_info(json.loads((out/'config.json').read_text()))['model_type'] == text_type
    ids = torch.tensor([[1, 5, 9, 13, 200]])
    assert torch.allclose(load_model(out)(ids), hf(input_ids=ids).logits, atol=1e-5)

@pytest.mark.filterwarnings("ignore:this qwen3_next model has a shared expert")
def test_qwen3_next_checkpoint_as_released(tmp_path):
    "A Qwen3-Next checkpoint as released: config.json gives `full_attention_interval`, not `layer_types`, and the checkpoint carries a multi-token-prediction block (`mtp.layers.0...`) that the model does not load. Its blocks are told apart, and the extra block is not taken for block 0."
    from safetensors.torch import load_file, save_file
    b, f, truth = _plain_pair('qwen3_next', tmp_path, {(0, 'attn_out'): 1, (0, 'mlp_out'): 1, (1, 'attn_q'): 1})
    for d in (b, f):
        cfg = json.loads((d/'config.json').read_text())
        for k in ('layer_types', 'linear_num_value_heads', 'linear_value_head_dim'): cfg.pop(k)
        (d/'config.json').write_text(json.dumps(cfg | dict(full_attention_interval=2, linear_num_value_heads=4, linear_value_head_dim=8)))
        sd = load_file(d/'model.safetensors')
        save_file(sd | {k.replace('model.layers.0.', 'mtp.layers.0.'): torch.randn_like(v) for k, v in sd.items() if k.startswith('model.layers.0.')}, d/'model.safetensors')
    info = arch_info(json.loads((b/'config.json').read_text()))
    assert info['linear_layers'] == (0,) and info['lin_v'] == 32
    d = compute_directions(b, f, k=1, matrices=['attn_out', 'mlp_out', 'attn_q'], progress=False)
    assert set(d.vectors) == set(truth) and all(subspace_cosines(d[key].T, U).min() >= 0.999 for key, U in truth.items())

@pytest.mark.filterwarnings("ignore:this (qwen3_next|qwen3_5_moe_text) model has a shared expert")
@pytest.mark.parametrize('arch', ['qwen3_5_text', 'qwen3_next'])
def test_write_hook_on_linear_attention_blocks(arch, tmp_path):
    "With `hook_point=WRITE_HOOK` ('{output}'), a linear-attention block's `attn_out` directions are compared with what its `out_proj` writes (the bridge names it `linear_attn`), in a forward pass, while generating and while steering."
    from weightwatch_nb.directions import WRITE_HOOK
    from weightwatch_nb.calibrate import calibrate, trace
    from weightwatch_nb.monitor import scan
    from weightwatch_nb.steer import steering, ProjectOut
    b, f, truth = _plain_pair(arch, tmp_path, {(0, 'attn_out'): 1, (1, 'attn_out'): 1})
    d = compute_directions(b, f, k=1, matrices=['attn_out'], hook_point=WRITE_HOOK, progress=False)
    assert d.hook(0, 'attn_out') == 'blocks.0.attn.hook_out' and all(subspace_cosines(d[key].T, U).min() >= 0.999 for key, U in truth.items())
    model = load_model(f)
    hf, seen = model.original_model.model.layers, {}
    assert not hasattr(hf[0], 'self_attn') and hasattr(hf[0], 'linear_attn') and hasattr(hf[1], 'self_attn')   # block 0: linear attention, block 1: full
    hs = [hf[0].linear_attn.out_proj.register_forward_hook(lambda mod, a, o: seen.setdefault(0, []).append(o.detach())),
          hf[1].self_attn.o_proj.register_forward_hook(lambda mod, a, o: seen.setdefault(1, []).append(o.detach()))]
    try: tr = trace(model, d, ['the model 3 of 2 and 7'])[0]
    finally:
        for h in hs: h.remove()
    for l in (0, 1):   # the truth: the cosine of each token's out_proj / o_proj output with the direction, from Hugging Face's own modules
        want = torch.nn.functional.cosine_similarity(seen[l][0][0], d[(l, 'attn_out')][0][None], dim=-1)
        assert torch.allclose(tr.cos[:, l], want, atol=1e-5), l
    mon = calibrate(model, d, [f'the model {i} of {j}' for i in range(6) for j in range(5)], margin=0.1)
    reps = scan(model, mon, ['the model 3 of 2', 'of of of the'], generate=4)
    assert all(len(r.generated) == 4 and r.cos.shape[0] > r.n_prompt for r in reps)   # scored past the prompt: the hooks fire while generating
    # ProjectOut at the linear block: Hugging Face's model with the direction projected out of out_proj's output
    u, ids = d[(0, 'attn_out')][0], torch.tensor([[1, 5, 9, 13, 200, 7]])
    h = hf[0].linear_attn.out_proj.register_forward_hook(lambda mod, a, o: o - (o @ u)[..., None] * u)
    try: want = model.original_model(ids).logits
    finally: h.remove()
    with torch.no_grad(), steering(model, ProjectOut(d, names=['L0.attn_out.u0'])): got = model(ids)
    assert (want - model(ids)).abs().max() > 1e-3 and torch.allclose(got, want, atol=1e-5)

def _scan_steer_and_edit(model, b, f, dw, key, module, ms, ids=None):
    "Shared checks of one block writer of a hybrid or parallel-experts model: the monitor's hooks fire while generating; `ProjectOut` of `key`'s first direction equals Hugging Face's model with it projected out of `module`'s output; and `_switched_and_edited_give_base`."
    from weightwatch_nb.calibrate import calibrate
    from weightwatch_nb.monitor import scan
    from weightwatch_nb.steer import steering, ProjectOut
    mon = calibrate(model, dw, [f'the model {i} of {j}' for i in range(6) for j in range(5)], margin=0.1)
    reps = scan(model, mon, ['the model 3 of 2', 'of of of the model'], generate=4, batch_size=2)
    assert all(len(r.generated) == 4 and r.cos.shape[0] > r.n_prompt for r in reps)   # scored past the prompt: the hooks fire while generating (with the cache)
    u = dw[key][0]
    ids = torch.tensor([[1, 5, 9, 13, 200, 7]]) if ids is None else ids
    h = module.register_forward_hook(lambda mod, a, o: o - (o @ u)[..., None] * u)
    try: want = model.original_model(ids).logits
    finally: h.remove()
    with torch.no_grad(), steering(model, ProjectOut(dw, names=[f'L{key[0]}.{key[1]}.u0'])): got = model(ids)
    assert (want - model(ids)).abs().max() > 1e-3 and torch.allclose(got, want, atol=1e-5)
    _switched_and_edited_give_base(model, b, f, mon, ms, ids)

@pytest.mark.filterwarnings("ignore:this granitemoehybrid model has a shared expert", "ignore:directions of")
@pytest.mark.parametrize('arch', ['granitemoehybrid', 'granitemoehybrid_dense'])
def test_granite_hybrid_of_mamba_and_attention(arch, tmp_path):
    "Granite 4.0-H: a Mamba block's `out_proj` is its `attn_out`, compared with what the bridge's `mixer` writes; the MLP beside any experts is a shared expert (or, with none, the MLP), at its own output; planted updates are found, scanned while generating, and removed by steering and edits."
    from weightwatch_nb.directions import WRITE_HOOK
    from weightwatch_nb.calibrate import trace
    moe = arch == 'granitemoehybrid'
    out, up = ('mlp_shared_out', 'mlp_shared_in') if moe else ('mlp_out', 'mlp_in')
    b, f, truth = _plain_pair(arch, tmp_path, {(0, 'attn_out'): 1, (1, 'attn_out'): 1, (0, out): 1, (1, up): 1})
    info = arch_info(json.loads((f/'config.json').read_text()))
    assert (info['family'], info['linear_layers'], info['mamba_inner']) == ('moe' if moe else 'llama', (0,), 128)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        dw = compute_directions(b, f, k=1, matrices=['attn_out', out], hook_point=WRITE_HOOK, progress=False)
    assert moe == any('compared with what the experts write' in str(x.message) for x in w)   # (with experts, no hook has the shared MLP's output alone)
    dr = compute_directions(b, f, k=1, matrices=[up], layers=[1], progress=False)
    _planted_found(truth, dw, dr)
    model = load_model(f)
    hf, seen = model.original_model.model.layers, {}
    assert hf[0].mamba is not None and hf[0].self_attn is None and hf[1].self_attn is not None   # block 0: Mamba-2, block 1: attention
    names = check_hooks(model, [dw.hook(0, 'attn_out'), dw.hook(1, 'attn_out'), dw.hook(0, out), dr.hook(1, up)])
    assert names == ['blocks.0.mixer.hook_out', 'blocks.1.attn.hook_out', 'blocks.0.moe.hook_out' if moe else 'blocks.0.shared_mlp.hook_out', 'blocks.1.ln2.hook_out']
    mods = {(0, 'attn_out'): hf[0].mamba.out_proj, (1, 'attn_out'): hf[1].self_attn.o_proj, (0, out): hf[0].shared_mlp.output_linear}
    hs = [m.register_forward_hook(lambda mod, a, o, key=key: seen.__setitem__(key, o.detach())) for key, m in mods.items()]
    hs.append(hf[1].shared_mlp.register_forward_pre_hook(lambda mod, a: seen.__setitem__((1, up), a[0].detach())))   # (the bridge splits input_linear into copies)
    try: tr = trace(model, dw, ['the model 3 of 2 and 7'])[0]; trr = trace(model, dr, ['the model 3 of 2 and 7'])[0]
    finally:
        for h in hs: h.remove()
    cos = lambda x, v: torch.nn.functional.cosine_similarity(x[0], v[None], dim=-1)
    for i, key in enumerate(k for k in dw.vectors if k != (0, out) or not moe):   # the truth: each token's cosine with what Hugging Face's own module writes
        assert torch.allclose(tr.cos[:, dw.names().index(f'L{key[0]}.{key[1]}.u0')], cos(seen[key], dw[key][0]), atol=1e-5), key
    assert torch.allclose(trr.cos[:, 0], cos(seen[(1, up)], dr[(1, up)][0]), atol=1e-5)   # and with what the MLP reads
    _scan_steer_and_edit(model, b, f, dw, (0, 'attn_out'), hf[0].mamba.out_proj, ['attn_out', out, up])   # (the Mamba block's writer)

@pytest.mark.filterwarnings("ignore:directions of")
def test_nemotron_h_blocks_of_one_mixer(tmp_path):
    "Nemotron-H: each block is one mixer (Mamba-2, attention or an MLP) behind one norm; each block's matrices are found, compared with what Hugging Face's mixer writes or reads, scanned while generating, and removed by steering and edits; blocks of experts are refused."
    from weightwatch_nb.directions import WRITE_HOOK
    from weightwatch_nb.calibrate import trace
    plant = {(0, 'attn_out'): 1, (1, 'mlp_out'): 1, (2, 'attn_out'): 1, (2, 'attn_q'): 1, (3, 'mlp_in'): 1}
    b, f, truth = _plain_pair('nemotron_h', tmp_path, plant)
    info = arch_info(json.loads((f/'config.json').read_text()))
    assert (info['n_layers'], info['block_kinds']) == (4, ('mamba', 'mlp', 'attention', 'mlp'))
    dw = compute_directions(b, f, k=1, matrices=['attn_out', 'mlp_out'], hook_point=WRITE_HOOK, progress=False)
    dr = compute_directions(b, f, k=1, matrices=['attn_q', 'mlp_in'], progress=False)
    assert sorted(dw.vectors) == [(0, 'attn_out'), (1, 'mlp_out'), (2, 'attn_out')] and sorted(dr.vectors) == [(2, 'attn_q'), (3, 'mlp_in')]   # each where its block has it
    _planted_found(truth, dw, dr)
    model = load_model(f)
    hf, seen = model.original_model.model.layers, {}
    keys = [(0, 'attn_out'), (1, 'mlp_out'), (2, 'attn_out'), (2, 'attn_q'), (3, 'mlp_in')]
    names = check_hooks(model, [(dw if m.endswith('_out') else dr).hook(l, m) for l, m in keys])
    assert names == ['blocks.0.mixer.hook_out', 'blocks.1.mixer.hook_out', 'blocks.2.mixer.hook_out', 'blocks.2.norm.hook_out', 'blocks.3.norm.hook_out']
    hs = [hf[0].mixer.out_proj.register_forward_hook(lambda mod, a, o: seen.__setitem__((0, 'attn_out'), o.detach())),
          hf[1].mixer.register_forward_hook(lambda mod, a, o: seen.__setitem__((1, 'mlp_out'), o.detach())),
          hf[2].mixer.o_proj.register_forward_hook(lambda mod, a, o: seen.__setitem__((2, 'attn_out'), o.detach())),
          hf[2].mixer.q_proj.register_forward_pre_hook(lambda mod, a: seen.__setitem__((2, 'attn_q'), a[0].detach())),
          hf[3].mixer.up_proj.register_forward_pre_hook(lambda mod, a: seen.__setitem__((3, 'mlp_in'), a[0].detach()))]
    try: trs = [trace(model, d, ['the model 3 of 2 and 7'])[0] for d in (dw, dr)]
    finally:
        for h in hs: h.remove()
    cos = lambda x, v: torch.nn.functional.cosine_similarity(x[0], v[None], dim=-1)
    for (l, m) in keys:   # the truth: each token's cosine with what Hugging Face's own modules write or read
        d, tr = (dw, trs[0]) if m.endswith('_out') else (dr, trs[1])
        assert torch.allclose(tr.cos[:, d.names().index(f'L{l}.{m}.u0')], cos(seen[(l, m)], d[(l, m)][0]), atol=1e-5), (l, m)
    _scan_steer_and_edit(model, b, f, dw, (0, 'attn_out'), hf[0].mixer.out_proj, ['attn_out', 'mlp_out', 'attn_q', 'mlp_in'])   # (the Mamba block's writer)
    with pytest.raises(WeightwatchError, match=r"blocks of experts \(Nemotron 3\), which are not mapped"):
        arch_info(json.loads((f/'config.json').read_text()) | dict(layers_block_type=['mamba', 'moe', 'attention', 'mlp']))
    assert arch_info({k: v for k, v in _config('nemotron_h').to_dict().items() if k != 'layers_block_type'} | dict(hybrid_override_pattern='M*-'))['block_kinds'] == ('mamba', 'attention', 'mlp')

def test_nemotron_h_config_as_published(tmp_path):
    "A Nemotron-H base whose config.json is as NVIDIA publishes it (`hybrid_override_pattern`, `num_hidden_layers`), fine-tuned and saved by transformers (which writes neither): one architecture, one fingerprint for checkpoint and loaded model; a config without `head_dim` is read with the class's."
    b, f, truth = _plain_pair('nemotron_h', tmp_path, {(2, 'attn_out'): 1})
    cfg = json.loads((b/'config.json').read_text())
    kinds = {'linear_attention': 'M', 'full_attention': '*', 'mlp': '-'}
    cfg = {k: v for k, v in cfg.items() if k != 'layers_block_type'} | dict(hybrid_override_pattern=''.join(kinds[k] for k in cfg['layers_block_type']), num_hidden_layers=4)
    (b/'config.json').write_text(json.dumps(cfg))
    assert arch_info(cfg)['q'] == arch_info(json.loads((f/'config.json').read_text()))['q'] == 64
    assert arch_info({k: v for k, v in cfg.items() if k != 'head_dim'})['q'] == 4 * 128   # (the class's head_dim, not 64 / 4)
    d = compute_directions(b, f, k=1, matrices=['attn_out'], progress=False)
    assert subspace_cosines(d[(2, 'attn_out')].T, truth[(2, 'attn_out')]).min() >= 0.999
    assert same_weights(fingerprint(b), fingerprint(load_model(b))) == 'exact'
    Directions.load(d.save(tmp_path/'d.safetensors'), model=load_model(f))

@pytest.mark.parametrize('arch', ['mamba', 'mamba2', 'falcon_mamba'])
def test_state_space_models(arch, tmp_path, monkeypatch):
    "Mamba, Mamba-2 and Falcon Mamba: one Mamba mixer per block, whose `out_proj` writes (`attn_out`): planted updates are found, each token's cosine is that of what Hugging Face's `out_proj` writes, they are scanned while generating and removed by steering and edits, and a change to `in_proj` (not mapped), by LoRA or in full, is named."
    from safetensors.torch import load_file, save_file
    from peft import LoraConfig, get_peft_model
    import transformers as T
    from weightwatch_nb.directions import WRITE_HOOK
    from weightwatch_nb.calibrate import trace
    b, f, truth = _plain_pair(arch, tmp_path, {(0, 'attn_out'): 1, (1, 'attn_out'): 1})
    info = arch_info(json.loads((f/'config.json').read_text()))
    assert (info['block_kinds'], info['mamba_inner'], info['tied']) == (('mamba', 'mamba'), 128, arch != 'mamba2')
    dw = compute_directions(b, f, k=1, matrices=['attn_out'], hook_point=WRITE_HOOK, progress=False)
    for key, U in truth.items(): assert subspace_cosines(dw[key].T, U).min() >= 0.999, key
    model = load_model(f)
    hf, seen = model.original_model.backbone.layers, {}
    assert check_hooks(model, [dw.hook(l, 'attn_out') for l in (0, 1)]) == ['blocks.0.mixer.hook_out', 'blocks.1.mixer.hook_out']
    hs = [hf[l].mixer.out_proj.register_forward_hook(lambda mod, a, o, l=l: seen.__setitem__(l, o.detach())) for l in (0, 1)]
    try: tr = trace(model, dw, ['the model 3 of 2 and 7'])[0]
    finally:
        for h in hs: h.remove()
    for l in (0, 1):   # the truth: each token's cosine with what Hugging Face's own out_proj writes
        want = torch.nn.functional.cosine_similarity(seen[l][0], dw[(l, 'attn_out')][0][None], dim=-1)
        assert torch.allclose(tr.cos[:, dw.names().index(f'L{l}.attn_out.u0')], want, atol=1e-5), l
    _scan_steer_and_edit(model, b, f, dw, (0, 'attn_out'), hf[0].mixer.out_proj, ['attn_out'])
    torch.manual_seed(0)   # PEFT refuses LoRA on a Mamba block's out_proj; an adapter on its in_proj changes nothing mapped, and says so
    pm = get_peft_model(T.AutoModelForCausalLM.from_pretrained(b), LoraConfig(r=2, lora_alpha=4, target_modules=['in_proj']))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if 'lora_B' in n: p.normal_(0, 0.1)
    pm.save_pretrained(tmp_path/'lora')
    with pytest.warns(UserWarning, match=rf"changes 2 module\(s\) that no {arch} matrix maps to \(e.g. \['base_model.model.backbone.layers.0.mixer.in_proj"):
        with pytest.raises(WeightwatchError, match="equal the base weights in every requested matrix"): compute_directions(b, lora=tmp_path/'lora', k=2, progress=False)
    assert compute_directions(b, f, k=1, progress=False).names() == ['L0.attn_out.u0', 'L1.attn_out.u0']   # (the default matrices: the writers it has)
    from weightwatch_nb.edit import remove_directions, interpolate
    from weightwatch_nb.demo import _read_matrices
    assert remove_directions(b, f, 1, progress=False).ww_edit['matrices'] == interpolate(b, f, 0.5, ['attn_out'], progress=False).ww_edit['matrices'] == ['attn_out']
    for ask in (['attn_out', 'mlp_out'], 'mlp_out,attn_out'):   # the default matrices asked for by name: refused, not quietly narrowed to the one it has
        for call in (lambda: compute_directions(b, f, k=1, matrices=ask, progress=False), lambda: interpolate(b, f, 0.5, ask, progress=False),
                     lambda: remove_directions(b, f, 1, ask, progress=False)):
            with pytest.raises(WeightwatchError, match=rf"{arch} has no `mlp_out` matrix; choose from \['attn_out', 'embed', 'unembed'\] \(or leave the matrices out"): call()
    from weightwatch_nb.cli import main
    err = io.StringIO()
    with contextlib.redirect_stderr(err): assert main(['directions', str(b), str(f), '-o', str(tmp_path/'d.safetensors'), '--matrices', 'attn_out,mlp_out', '--quiet']) == 2
    assert 'has no `mlp_out` matrix' in err.getvalue() and not (tmp_path/'d.safetensors').exists(), err.getvalue()
    assert main(['directions', str(b), str(f), '-o', str(tmp_path/'d.safetensors'), '--k', '1', '--quiet']) == 0
    assert Directions.load(tmp_path/'d.safetensors').meta['matrices'] == ['attn_out']
    import weightwatch_nb.edit as E; monkeypatch.setattr(E, 'measure', lambda *a, **kw: {})   # (the sweep's table too; its behaviours are not what is tested here)
    assert [r['matrices'] for r in E.sweep(b, f, ks=(1,), alphas=(), sets={'x': []}, progress=False)] == ['attn_out']
    with pytest.warns(UserWarning, match="no read-side matrices mapped.*the read side is skipped"): assert not _read_matrices(f, True)
    if arch != 'mamba2':   # a stored `intermediate_size` is the width, not `expand` times the model's (Falcon Mamba 7B: 8192, not 16 × 4096)
        cfg = _config(arch).to_dict() | dict(expand=16, intermediate_size=128)
        with torch.device('meta'): inner = T.AutoModelForCausalLM.from_config(T.AutoConfig.for_model(**cfg)).backbone.layers[0].mixer.out_proj.in_features
        assert arch_info({k: v for k, v in cfg.items()})['mamba_inner'] == inner == 128
    sd = load_file(f/'model.safetensors'); sd['backbone.layers.1.mixer.in_proj.weight'] *= 1.01; save_file(sd, f/'model.safetensors', metadata={'format': 'pt'})
    with pytest.warns(UserWarning, match=rf"also changes 1 matrix that no {arch} matrix maps to \(e.g. \['backbone.layers.1.mixer.in_proj.weight'\]\)"):
        compute_directions(b, f, k=1, progress=False)

@pytest.mark.filterwarnings("ignore:directions of")   # (read and write matrices together)
@pytest.mark.parametrize('arch', ['youtu', 'youtu_q'])
def test_dense_latent_attention(arch, tmp_path):
    "Youtu-LLM: DeepSeek-V3's latent attention (`o_proj` writes; the query latent, or `q_proj`, and the key-value latent read) and Llama's MLP in every block: planted updates are found, the read side is compared with exactly what those matrices multiply, and scanning, steering and edits work."
    from weightwatch_nb.delta import block_matrices
    plant = {(0, 'attn_out'): 1, (0, 'attn_q'): 1, (1, 'attn_kv'): 1, (1, 'attn_q'): 1, (1, 'mlp_out'): 1, (1, 'mlp_gate'): 1}
    b, f, truth = _plain_pair(arch, tmp_path, plant)
    info, ms = arch_info(json.loads((f/'config.json').read_text())), sorted({m for _, m in plant})
    assert info['family'] == 'llama' and (info['o'], info['kv_latent'], info['q_read']) == (64, 24, 32 if arch == 'youtu' else 64)
    assert set(block_matrices(f)) == {'attn_out', 'attn_q', 'attn_kv', 'mlp_out', 'mlp_in', 'mlp_gate'}   # no k or v of their own
    d = compute_directions(b, f, k=1, matrices=ms, progress=False)
    for key, U0 in truth.items(): assert subspace_cosines(d[key].T, U0).min() >= 0.999, key
    model = load_model(f)
    hf, seen = model.original_model.model.layers, {}
    q = 'q_a_proj' if arch == 'youtu' else 'q_proj'
    hs = [getattr(hf[1].self_attn, p).register_forward_hook(lambda mod, a, o, p=p: seen.__setitem__(p, a[0].detach())) for p in (q, 'kv_a_proj_with_mqa')]
    try: _, cache = model.run_with_cache(torch.tensor([[1, 5, 9, 13, 200]]), names_filter=lambda n: n == 'blocks.1.ln1.hook_out')
    finally:
        for h in hs: h.remove()
    dr = compute_directions(b, f, k=1, matrices=['attn_q', 'attn_kv'], progress=False)   # (the read side alone)
    assert dr.hook(1, 'attn_q') == dr.hook(1, 'attn_kv') == 'blocks.1.ln1.hook_out'
    assert torch.equal(cache['blocks.1.ln1.hook_out'], seen[q]) and torch.equal(cache['blocks.1.ln1.hook_out'], seen['kv_a_proj_with_mqa'])
    from weightwatch_nb.directions import WRITE_HOOK
    dw = compute_directions(b, f, k=1, matrices=['attn_out', 'mlp_out'], hook_point=WRITE_HOOK, progress=False)
    assert check_hooks(model, [dw.hook(0, 'attn_out')]) == ['blocks.0.attn.hook_out']
    _scan_steer_and_edit(model, b, f, dw, (0, 'attn_out'), hf[0].self_attn.o_proj, ms)

HYBRID_PARTS = {'bamba': (lambda l: l.mamba.out_proj, lambda l: l.self_attn.o_proj, 'mixer'), 'lfm2': (lambda l: l.conv.out_proj, lambda l: l.self_attn.out_proj, 'conv')}   # (mixer's output, attention's, bridge name)

@pytest.mark.filterwarnings("ignore:directions of")
@pytest.mark.parametrize('arch', list(HYBRID_PARTS))
def test_hybrid_of_mamba_or_convolution_and_attention(arch, tmp_path):
    "Bamba (Mamba-2 blocks, attention at `attn_layer_indices`) and LFM2 (short-convolution blocks among attention blocks), an MLP under `feed_forward` in each block: planted updates are found, compared with what Hugging Face's modules write and read, scanned while generating, and removed by steering and edits."
    from weightwatch_nb.directions import WRITE_HOOK
    from weightwatch_nb.calibrate import trace
    mixer, attn, name = HYBRID_PARTS[arch]
    b, f, truth = _plain_pair(arch, tmp_path, {(0, 'attn_out'): 1, (1, 'attn_out'): 1, (0, 'mlp_out'): 1, (1, 'mlp_in'): 1})
    info = arch_info(json.loads((f/'config.json').read_text()))
    assert (info['linear_layers'], info['d_mlp'], info.get('mamba_inner')) == (((0,), 96, 128) if arch == 'bamba' else ((0,), 128, None))
    dw = compute_directions(b, f, k=1, matrices=['attn_out', 'mlp_out'], hook_point=WRITE_HOOK, progress=False)
    dr = compute_directions(b, f, k=1, matrices=['mlp_in'], progress=False)
    _planted_found(truth, dw, dr)
    model = load_model(f)
    hf, seen = model.original_model.model.layers, {}
    keys = [(0, 'attn_out'), (1, 'attn_out'), (0, 'mlp_out'), (1, 'mlp_in')]
    assert check_hooks(model, [(dw if m.endswith('_out') else dr).hook(l, m) for l, m in keys]) == [f'blocks.0.{name}.hook_out', 'blocks.1.attn.hook_out', 'blocks.0.mlp.hook_out', 'blocks.1.ln2.hook_out']
    hs = [mixer(hf[0]).register_forward_hook(lambda mod, a, o: seen.__setitem__((0, 'attn_out'), o.detach())),
          attn(hf[1]).register_forward_hook(lambda mod, a, o: seen.__setitem__((1, 'attn_out'), o.detach())),
          hf[0].feed_forward.register_forward_hook(lambda mod, a, o: seen.__setitem__((0, 'mlp_out'), o.detach())),
          hf[1].feed_forward.register_forward_pre_hook(lambda mod, a: seen.__setitem__((1, 'mlp_in'), a[0].detach()))]
    try: trs = [trace(model, d, ['the model 3 of 2 and 7'])[0] for d in (dw, dr)]
    finally:
        for h in hs: h.remove()
    for l, m in keys:   # the truth: each token's cosine with what Hugging Face's own modules write or read
        d, tr = (dw, trs[0]) if m.endswith('_out') else (dr, trs[1])
        want = torch.nn.functional.cosine_similarity(seen[(l, m)][0], d[(l, m)][0][None], dim=-1)
        assert torch.allclose(tr.cos[:, d.names().index(f'L{l}.{m}.u0')], want, atol=1e-5), (l, m)
    _scan_steer_and_edit(model, b, f, dw, (0, 'attn_out'), mixer(hf[0]), ['attn_out', 'mlp_out', 'mlp_in'])   # (the Mamba or convolution block's writer)

_SHARED_MS, _MLP_MS = ['mlp_shared_out', 'mlp_shared_in', 'mlp_shared_gate'], ['mlp_out', 'mlp_in', 'mlp_gate']
HYBRID_LORA = {   # arch: (LoRA targets, the Mamba or convolution module, matrices, the blocks and matrices the adapter changes)
    'granitemoehybrid': (['q_proj', 'o_proj', 'out_proj', 'input_linear', 'output_linear', 'in_proj'], 'mamba', ['attn_out', 'attn_q', *_SHARED_MS],
                         [(l, m) for l in (0, 1) for m in ['attn_out', 'attn_q', *_SHARED_MS] if (l, m) != (0, 'attn_q')]),   # (block 0 is Mamba: no queries)
    'granitemoehybrid_dense': (['q_proj', 'o_proj', 'out_proj', 'input_linear', 'output_linear', 'in_proj'], 'mamba', ['attn_out', 'attn_q', *_MLP_MS],
                               [(l, m) for l in (0, 1) for m in ['attn_out', 'attn_q', *_MLP_MS] if (l, m) != (0, 'attn_q')]),
    'nemotron_h': (['q_proj', 'o_proj', 'up_proj', 'down_proj', 'in_proj'], 'mixer', ['attn_out', 'attn_q', 'mlp_out', 'mlp_in'],   # (PEFT refuses a Mamba out_proj)
                   [(1, 'mlp_in'), (1, 'mlp_out'), (2, 'attn_out'), (2, 'attn_q'), (3, 'mlp_in'), (3, 'mlp_out')]),
    'bamba': (['q_proj', 'o_proj', 'out_proj', 'up_proj', 'down_proj', 'in_proj'], 'mamba', ['attn_out', 'attn_q', 'mlp_out', 'mlp_in'],
              [(0, 'attn_out'), (0, 'mlp_in'), (0, 'mlp_out'), (1, 'attn_out'), (1, 'attn_q'), (1, 'mlp_in'), (1, 'mlp_out')]),
    'lfm2': (['q_proj', 'out_proj', 'w3', 'w2', 'in_proj'], 'conv', ['attn_out', 'attn_q', 'mlp_out', 'mlp_in'],
             [(0, 'attn_out'), (0, 'mlp_in'), (0, 'mlp_out'), (1, 'attn_out'), (1, 'attn_q'), (1, 'mlp_in'), (1, 'mlp_out')])}

@pytest.mark.filterwarnings("ignore:directions of")   # (read and write matrices together: only their equality is tested)
@pytest.mark.parametrize('arch', list(HYBRID_LORA))
def test_lora_on_hybrids(arch, tmp_path):
    "A LoRA adapter on the attention, the Mamba or convolution blocks' `out_proj` and the MLP (beside any experts) of Granite 4.0-H, Nemotron-H, Bamba and LFM2, read without merging: the directions are the merged model's, and the mixer's `in_proj` (not mapped) is named in a warning."
    from peft import LoraConfig, get_peft_model
    import transformers as T
    targets, mixer, ms, want = HYBRID_LORA[arch]
    b, _, _ = _plain_pair(arch, tmp_path, {(0, 'attn_out'): 1})
    torch.manual_seed(0)
    pm = get_peft_model(T.AutoModelForCausalLM.from_pretrained(b), LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if 'lora_B' in n: p.normal_(0, 0.1)
    pm.save_pretrained(tmp_path/'lora')
    merged, mt = pm.merge_and_unload(), VARIANTS.get(arch, (arch,))[0]
    with pytest.warns(UserWarning, match=rf"changes 1 module\(s\) that no {mt} matrix maps to \(e.g. \['base_model.model.model.layers.0.{mixer}.in_proj"):
        dl = compute_directions(b, lora=tmp_path/'lora', k=2, matrices=ms, progress=False)
    dm = compute_directions(b, merged, k=2, matrices=ms, method='exact', progress=False)
    assert sorted(dl.vectors) == sorted(dm.vectors) == sorted(want)
    assert all(torch.allclose(dl.vectors[k], dm.vectors[k], atol=1e-4) for k in dl.vectors)

def test_missing_hooks_are_named():
    "A hook the model lacks, with no alias either, is named in the error; aliases stand in for the hooks a block lacks."
    from weightwatch_nb.calibrate import check_hooks
    class M: hook_dict = {'blocks.0.linear_attn.hook_out': None, 'blocks.1.attn.hook_out': None}
    assert check_hooks(M(), ['blocks.0.attn.hook_out', 'blocks.1.attn.hook_out']) == ['blocks.0.linear_attn.hook_out', 'blocks.1.attn.hook_out']
    with pytest.raises(WeightwatchError, match=r"hook 'blocks.2.attn.hook_out', which this .* does not have"): check_hooks(M(), ['blocks.2.attn.hook_out'])
    class G: hook_dict = dict.fromkeys(['blocks.0.mixer.hook_out', 'blocks.0.moe.hook_out', 'blocks.0.shared_mlp.hook_out', 'blocks.1.shared_mlp.hook_out'])   # Granite 4.0-H
    assert check_hooks(G(), ['blocks.0.attn.hook_out', 'blocks.0.mlp.hook_out', 'blocks.1.mlp.hook_out']) == ['blocks.0.mixer.hook_out', 'blocks.0.moe.hook_out', 'blocks.1.shared_mlp.hook_out']

@pytest.mark.filterwarnings("ignore:directions of", "ignore:gemma4_text normalises")   # (read and write matrices together, and at the default hook: only their equality is tested)
def test_gemma4_blocks_of_their_own_sizes(tmp_path):
    "Gemma 4: each block's matrices at its own sizes (full attention's wider heads, the double-wide MLP of the blocks that reuse earlier keys and values), no k or v where a block has none, and a LoRA adapter on all of them read as PEFT merges it."
    import transformers as T
    from peft import LoraConfig, get_peft_model
    from weightwatch_nb.calibrate import calibrate
    from weightwatch_nb.steer import steering, _AllOn as AllOn
    from weightwatch_nb.edit import removed_update
    from weightwatch_nb.delta import block_matrices
    from weightwatch_nb.directions import DEFAULT_HOOK
    b, f, truth = _plain_pair('gemma4_text', tmp_path, {(1, 'attn_k'): 1, (2, 'attn_out'): 1, (3, 'attn_q'): 1, (3, 'mlp_in'): 1})
    cfg = json.loads((b/'config.json').read_text())
    info = arch_info(cfg)
    hf = load_hf(b)[0].model.layers
    assert (info['kv_shared_layers'], info['k_is_v_layers']) == ((2, 3), (1,))
    assert [(l.self_attn.k_proj is not None if hasattr(l.self_attn, 'k_proj') else False, getattr(l.self_attn, 'v_proj', None) is not None) for l in hf] == \
           [(True, True), (True, False), (False, False), (False, False)]   # as transformers builds it
    keys = find_keys(open_tensors(b).keys(), info, list(block_matrices(b)))
    assert {l: sorted(m for k, m in keys if k == l) for l in range(4)} == {0: ['attn_k', 'attn_out', 'attn_q', 'attn_v', 'mlp_gate', 'mlp_in', 'mlp_out'],
        1: ['attn_k', 'attn_out', 'attn_q', 'mlp_gate', 'mlp_in', 'mlp_out'], 2: ['attn_out', 'attn_q', 'mlp_gate', 'mlp_in', 'mlp_out'], 3: ['attn_out', 'attn_q', 'mlp_gate', 'mlp_in', 'mlp_out']}
    shapes = {(l, m): tuple(D.shape) for l, m, D in iter_deltas(b, f, ['attn_q', 'attn_k', 'mlp_in'])}
    assert shapes == {(0, 'attn_q'): (64, 64), (1, 'attn_q'): (64, 128), (2, 'attn_q'): (64, 64), (3, 'attn_q'): (64, 128), (0, 'attn_k'): (64, 32), (1, 'attn_k'): (64, 32),
                      **{(l, 'mlp_in'): (64, 256 if l >= 2 else 128) for l in range(4)}}
    d = compute_directions(b, f, k=1, matrices=['attn_k', 'attn_out', 'attn_q', 'mlp_in'], progress=False)
    for key, U0 in truth.items(): assert subspace_cosines(d[key].T, U0).min() >= 0.999, key
    # as released (config.json gives global_head_dim, no per_layer_config): the same sizes
    rel = {k: v for k, v in cfg.items() if k != 'per_layer_config'} | dict(global_head_dim=32, num_global_key_value_heads=1)
    assert {k: v for k, v in arch_info(rel).items() if k != 'specs'} == {k: v for k, v in info.items() if k != 'specs'}
    # ClipWeights, every token switched: the base model
    model, ids = load_model(f), torch.tensor([[1, 5, 9, 13, 200, 7]])
    mon = calibrate(model, d, [f'the model {i} of {j}' for i in range(6) for j in range(5)], margin=0.1)
    with torch.no_grad(), steering(model, AllOn(mon, removed_update(b, f, 1, matrices=['attn_k', 'attn_out', 'attn_q', 'mlp_in'], like=model, progress=False))):
        assert torch.allclose(model(ids), load_model(b)(ids), atol=1e-4)
    torch.manual_seed(0)
    pm = get_peft_model(T.AutoModelForCausalLM.from_pretrained(b), LoraConfig(r=2, lora_alpha=4, target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj', 'up_proj', 'down_proj']))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if 'lora_B' in n: p.normal_(0, 0.1)
    pm.save_pretrained(tmp_path/'lora')
    ms = ['attn_q', 'attn_k', 'attn_v', 'attn_out', 'mlp_in', 'mlp_out']
    dl = compute_directions(b, lora=tmp_path/'lora', k=2, matrices=ms, hook_point=DEFAULT_HOOK, progress=False)
    dm = compute_directions(b, pm.merge_and_unload(), k=2, matrices=ms, hook_point=DEFAULT_HOOK, method='exact', progress=False)
    assert dl.names() == dm.names() and len(dl) == 2 * (6 + 5 + 4 + 4)   # every matrix of every block, as many as each block has
    for key in dl.vectors: assert torch.allclose(dl.vectors[key], dm.vectors[key], atol=1e-4), key

def test_changes_no_matrix_maps_are_named(tmp_path):
    "A full fine-tune that also changes matrices no matrix of the architecture maps to (Gemma 4's per-layer inputs) is warned about by name; one that changes only mapped matrices is not."
    from safetensors.torch import load_file, save_file
    b, f, _ = _plain_pair('gemma4_text', tmp_path, {(0, 'attn_out'): 1})
    with warnings.catch_warnings():
        warnings.simplefilter('error', UserWarning)
        compute_directions(b, f, k=1, matrices=['attn_out'], hook_point='blocks.{layer}.{output}', progress=False)   # only mapped changes: silent
    sd = load_file(f/'model.safetensors')
    sd['model.layers.1.per_layer_projection.weight'] *= 1.01
    sd['model.embed_tokens_per_layer.weight'][7] += 0.01   # one token's row: a table this small is compared whole
    save_file(sd, f/'model.safetensors', metadata={'format': 'pt'})
    with pytest.warns(UserWarning, match=r"also changes 2 matrices that no gemma4_text matrix maps to \(e.g. \['model.embed_tokens_per_layer.weight', 'model.layers.1.per_layer_projection.weight'\]\)"):
        d = compute_directions(b, f, k=1, matrices=['attn_out'], hook_point='blocks.{layer}.{output}', progress=False)
    assert d.names() == ['L0.attn_out.u0']

def test_glm5_indexer_changes_are_named(tmp_path):
    "GLM-5's sparse-attention indexer reads the residual stream through matrices no matrix maps to (`indexer.wk`, `indexer.weights_proj`): a fine-tune that changes them is warned about, and the mapped change is still found."
    from safetensors.torch import load_file, save_file
    b, f, truth = _plain_pair('glm_moe_dsa', tmp_path, {(1, 'attn_q'): 1})
    sd = load_file(f/'model.safetensors')
    for n in ('wk', 'weights_proj'): sd[f'model.layers.0.self_attn.indexer.{n}.weight'] *= 1.01
    save_file(sd, f/'model.safetensors', metadata={'format': 'pt'})
    with pytest.warns(UserWarning, match=r"also changes 2 matrices that no glm_moe_dsa matrix maps to \(e.g. \['model.layers.0.self_attn.indexer.weights_proj.weight', 'model.layers.0.self_attn.indexer.wk.weight'\]\)"):
        d = compute_directions(b, f, k=1, matrices=['attn_q'], progress=False)
    assert d.names() == ['L1.attn_q.u0'] and subspace_cosines(d[(1, 'attn_q')].T, truth[(1, 'attn_q')]).min() >= 0.999

@pytest.mark.filterwarnings("ignore:this gemma4_text model has an MLP beside its experts")
def test_gemma4_with_experts_beside_the_mlp(tmp_path):
    "Gemma 4 26B A4B: experts beside the MLP, each with its own norms. The experts are `mlp_*` (compared with what they read and write, which the bridge sees flattened), the MLP a shared expert; planted updates are found, scanned while generating, and removed by steering and edits; routing is read from the router."
    from weightwatch_nb.directions import WRITE_HOOK, READ_HOOK
    from weightwatch_nb.calibrate import trace
    from weightwatch_nb.interpret import routed_experts, trace_corpus
    plant = {(0, 'attn_out'): 1, (0, 'mlp_out'): 1, (0, 'mlp_shared_out'): 1, (1, 'mlp_in'): 1, (1, 'mlp_gate'): 1, (1, 'mlp_shared_in'): 1}
    b, f, truth = _plain_pair('gemma4_moe', tmp_path, plant)
    info = arch_info(json.loads((f/'config.json').read_text()))
    assert (info['family'], info['n_experts'], info['d_mlp@0'], info['d_shared@0']) == ('moe', 3, 32, 128)
    dw = compute_directions(b, f, k=1, matrices=['attn_out', 'mlp_out', 'mlp_shared_out'], progress=False)   # post-norm: at the sub-layer outputs
    dr = compute_directions(b, f, k=1, matrices=['mlp_in', 'mlp_gate', 'mlp_shared_in'], progress=False)
    assert (dw.hook_point, dr.hook_point) == ('blocks.{layer}.{beside_output}', 'blocks.{layer}.{beside_input}')
    with pytest.warns(UserWarning, match=r"has an MLP beside its experts \(mapped as a shared expert\), and \['mlp_shared_out'\] are not among"):
        assert compute_directions(b, f, k=1, matrices=['mlp_out'], hook_point=WRITE_HOOK, progress=False).hook_point == dw.hook_point   # (either template means the same)
    assert compute_directions(b, f, k=1, matrices=['mlp_in'], hook_point=READ_HOOK, progress=False).hook_point == dr.hook_point
    _planted_found(truth, dw, dr)
    model = load_model(f)
    hf, seen = model.original_model.model.layers, {}
    keys = [(0, 'attn_out'), (0, 'mlp_out'), (0, 'mlp_shared_out'), (1, 'mlp_in'), (1, 'mlp_shared_in')]
    dirs = lambda m: dw if m.endswith('_out') else dr
    assert check_hooks(model, [dirs(m).hook(l, m) for l, m in keys]) == ['blocks.0.attn.hook_out', 'blocks.0.post_feedforward_layernorm_2.hook_in',
                                                                       'blocks.0.mlp.hook_out', 'blocks.1.pre_feedforward_layernorm_2.hook_out', 'blocks.1.ln2.hook_out']
    first = lambda o: (o[0] if isinstance(o, tuple) else o).detach()
    hs = [hf[0].self_attn.register_forward_hook(lambda mod, a, o: seen.__setitem__((0, 'attn_out'), first(o))),
          hf[0].experts.register_forward_hook(lambda mod, a, o: seen.__setitem__((0, 'mlp_out'), first(o))),
          hf[0].mlp.register_forward_hook(lambda mod, a, o: seen.__setitem__((0, 'mlp_shared_out'), first(o))),
          hf[1].experts.register_forward_pre_hook(lambda mod, a: seen.__setitem__((1, 'mlp_in'), a[0].detach())),
          hf[1].mlp.register_forward_pre_hook(lambda mod, a: seen.__setitem__((1, 'mlp_shared_in'), a[0].detach()))]
    try: trs = {id(d): trace(model, d, ['the model 3 of 2 and 7'])[0] for d in (dw, dr)}
    finally:
        for h in hs: h.remove()
    for l, m in keys:   # the truth: each token's cosine with what Hugging Face's modules write or read (the experts: flattened)
        d = dirs(m); x = seen[(l, m)].reshape(-1, 64)
        want = torch.nn.functional.cosine_similarity(x, d[(l, m)][0][None], dim=-1)
        assert torch.allclose(trs[id(d)].cos[:, d.names().index(f'L{l}.{m}.u0')], want, atol=1e-5), (l, m)
    _scan_steer_and_edit(model, b, f, dw, (0, 'mlp_out'), hf[0].experts, list(dict.fromkeys(m for _, m in plant)),   # (the experts' writer, flattened,
                         ids=torch.tensor([[1, 5, 9, 13, 200, 7], [1, 7, 7, 9, 4, 3]]))   # two sequences at a time)
    tr, picks = trace_corpus(model, dw, ['the model 3 of 2'])[0], []
    h = hf[1].router.register_forward_hook(lambda mod, a, o: picks.append(o[2]))
    try: got = routed_experts(model, [tr], [1])[0]
    finally: h.remove()
    assert got.shape == (len(tr.ids), 1, 2) and torch.equal(got[:, 0], picks[0].reshape(len(tr.ids), 2))   # the router's own picks
    from weightwatch_nb.interpret import expert_routing   # (the experts counted as mapped: Gemma 4's are not stored one by one)
    er = expert_routing(model, trace_corpus(model, dw, [f'the model {i} of 2' for i in range(4)]), dw, names=['L0.mlp_out.u0'], top=0.25)
    assert er.overall.shape == (1, 3) and torch.allclose(er.overall.sum(-1), torch.ones(1))
    from weightwatch_nb.calibrate import Tracer   # a flattened hook whose rows are not one per token is refused, not mis-shaped
    t = Tracer(dw); t.start(torch.ones(2, 3, dtype=torch.bool))
    (hk, fn), = [(a, f) for a, f in t.hooks() if 'post_feedforward_layernorm_2' in a and a.startswith('blocks.0')]
    with pytest.raises(WeightwatchError, match="gives 5 rows, not one per token of the 2 sequence"): fn(torch.zeros(5, 64), type('H', (), {'name': hk})())
    from safetensors.torch import load_file, save_file   # the router reads the stream through a scale of its own: not mapped, and named when changed
    sd = load_file(f/'model.safetensors'); sd['model.layers.1.router.proj.weight'] *= 1.01; save_file(sd, f/'model.safetensors', metadata={'format': 'pt'})
    with pytest.warns(UserWarning, match=r"also changes 1 matrix that no gemma4_text matrix maps to \(e.g. \['model.layers.1.router.proj.weight'\]\)"):
        compute_directions(b, f, k=1, matrices=['mlp_in', 'mlp_gate', 'mlp_shared_in', 'mlp_shared_gate'], progress=False)

def test_laguna_heads_gate_and_stored_names(tmp_path):
    "Laguna: its checkpoints store Qwen2-MoE's names (`shared_expert`, experts one by one), read as transformers 5 loads them; its blocks' head count comes from `num_attention_heads_per_layer` (different counts are refused); the gate on each head's output (`g_proj`) is not mapped, and named when changed."
    import transformers as T
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    b, f, truth = _plain_pair('laguna', tmp_path, {(1, 'mlp_shared_out'): 1, (0, 'mlp_out'): 1})
    with safe_open(str(f/'model.safetensors'), 'pt') as fh: stored = list(fh.keys())
    assert 'model.layers.1.mlp.shared_expert.down_proj.weight' in stored and 'model.layers.1.mlp.experts.2.up_proj.weight' in stored
    d = compute_directions(b, f, k=1, matrices=['mlp_out', 'mlp_shared_out'], progress=False)
    for key, U0 in truth.items(): assert subspace_cosines(d[key].T, U0).min() >= 0.999, key
    Directions.load(d.save(tmp_path/'d.safetensors'), model=load_model(f))   # the stored names' fingerprint is the loaded model's
    cfg = _config('laguna').to_dict() | dict(num_attention_heads=8, num_attention_heads_per_layer=[2, 2])   # (the blocks' own count wins)
    with torch.device('meta'): q = T.AutoModelForCausalLM.from_config(T.AutoConfig.for_model(**cfg)).model.layers[0].self_attn.q_proj
    assert arch_info(cfg)['q'] == q.out_features == 32
    with pytest.raises(WeightwatchError, match=r"different numbers of attention heads \(num_attention_heads_per_layer: \[2, 4\]\)"):
        arch_info(cfg | dict(num_attention_heads_per_layer=[2, 4]))
    from weightwatch_nb.core import check_comparable   # a gate per unit is another model (g_proj of another shape)
    c = json.loads((b/'config.json').read_text()); (tmp_path/'pe').mkdir(); (tmp_path/'pe'/'config.json').write_text(json.dumps(c | dict(gating='per-element')))
    with pytest.raises(WeightwatchError, match="differ in `gating`: True vs per-element"): check_comparable(b, tmp_path/'pe', check_tokenizer=False)
    sd = load_file(f/'model.safetensors'); sd['model.layers.1.self_attn.g_proj.weight'] *= 1.01; save_file(sd, f/'model.safetensors', metadata={'format': 'pt'})
    with pytest.warns(UserWarning, match=r"also changes 1 matrix that no laguna matrix maps to \(e.g. \['model.layers.1.self_attn.g_proj.weight'\]\)"):
        compute_directions(b, f, k=1, matrices=['mlp_out', 'mlp_shared_out'], progress=False)

@pytest.mark.parametrize('targets', [['gate', 'router'], r'.*\.(gate|router)'])
def test_phimoe_transformers4_router_adapter_refused(targets, tmp_path):
    "A transformers 4 adapter on PhiMoE's router (`block_sparse_moe.gate`, `mlp.router` in transformers 5): PEFT's conversion moves it to `mlp.gate`, which does not exist, and loads nothing, even where the targets name the router, so it is refused."
    import transformers as T
    from peft import PeftModel
    from safetensors.torch import save_file
    b, _, _ = _plain_pair('phimoe', tmp_path, {(0, 'attn_out'): 1})
    torch.manual_seed(0)
    (tmp_path/'lora').mkdir(); save_file({f'base_model.model.model.layers.{l}.block_sparse_moe.gate.lora_{x}.weight': 0.1 * torch.randn(*s)
                                          for l in range(2) for x, s in (('A', (2, 64)), ('B', (3, 2)))}, tmp_path/'lora'/'adapter_model.safetensors')
    (tmp_path/'lora'/'adapter_config.json').write_text(json.dumps(dict(peft_type='LORA', r=2, lora_alpha=4, target_modules=targets, base_model_name_or_path=str(b))))
    with pytest.raises(WeightwatchError, match="a module of transformers 4's phimoe, which PEFT does not convert"):
        compute_directions(b, lora=tmp_path/'lora', k=1, matrices=['mlp_router'], progress=False)
    merged = PeftModel.from_pretrained(T.AutoModelForCausalLM.from_pretrained(b), tmp_path/'lora').merge_and_unload()   # (PEFT: the router unchanged)
    assert all(D.abs().max() == 0 for *_, D in iter_deltas(b, merged, ['mlp_router']))

def test_laguna_transformers4_adapter_on_its_shared_expert(tmp_path):
    "A transformers 4 style adapter on Laguna's shared expert, under the names its checkpoints store (`shared_expert`): PEFT renames it as transformers 5 renames the checkpoint and loads it there, and so does the reader (the directions are the PEFT-loaded model's)."
    import transformers as T
    from peft import PeftModel
    from safetensors.torch import save_file
    b, _, _ = _plain_pair('laguna_dense', tmp_path, {(0, 'attn_out'): 1})
    torch.manual_seed(0)
    sd = {f'base_model.model.model.layers.1.mlp.shared_expert.{n}.lora_{x}.weight': 0.1 * torch.randn(*s) for n, (i, o) in
          (('gate_proj', (64, 80)), ('up_proj', (64, 80)), ('down_proj', (80, 64))) for x, s in (('A', (2, i)), ('B', (o, 2)))}
    (tmp_path/'lora').mkdir(); save_file(sd, tmp_path/'lora'/'adapter_model.safetensors')
    (tmp_path/'lora'/'adapter_config.json').write_text(json.dumps(dict(peft_type='LORA', r=2, lora_alpha=4, target_modules=['gate_proj', 'up_proj', 'down_proj'], base_model_name_or_path=str(b))))
    ms = ['mlp_shared_out', 'mlp_shared_in', 'mlp_shared_gate']
    dl = compute_directions(b, lora=tmp_path/'lora', k=2, matrices=ms, progress=False)
    merged = PeftModel.from_pretrained(T.AutoModelForCausalLM.from_pretrained(b), tmp_path/'lora').merge_and_unload()
    dm = compute_directions(b, merged, k=2, matrices=ms, method='exact', progress=False)
    assert sorted(dl.vectors) == sorted(dm.vectors) == [(1, m) for m in ('mlp_shared_gate', 'mlp_shared_in', 'mlp_shared_out')]
    assert all(torch.allclose(dl.vectors[k], dm.vectors[k], atol=1e-4) for k in dl.vectors)
    cfg = json.loads((tmp_path/'lora'/'adapter_config.json').read_text()) | dict(target_modules=['q_proj'])   # one PEFT would not wrap there: refused
    (tmp_path/'lora'/'adapter_config.json').write_text(json.dumps(cfg))
    with pytest.raises(WeightwatchError, match="a module of transformers 4's laguna, which PEFT does not convert"): compute_directions(b, lora=tmp_path/'lora', k=2, matrices=ms, progress=False)

def test_older_configs_read_as_their_classes_read_them():
    "BLOOM's `n_embed` is its hidden size; OPT's `word_embed_proj_dim: null` means the hidden size; BLOOM adding blocks to the normalised stream is refused; a Llama 4 config that leaves sizes to its class, or a GLM-4.7-Flash config its dense blocks, is read with the class's."
    from weightwatch_nb.core import WeightwatchError
    bloom = _config('bloom').to_dict()
    lfm = {k: v for k, v in _config('lfm2').to_dict().items() if k not in ('layer_types', 'intermediate_size')} | dict(full_attn_idxs=[1], tie_embedding=False, block_ff_dim=192)   # LFM2's older names,
    assert [arch_info(lfm)[k] for k in ('linear_layers', 'tied', 'd_mlp')] == [(0,), False, 128]   # which its class reads first
    assert arch_info(lfm | dict(full_attn_idxs=[]))['linear_layers'] == (0, 1)   # (none listed: every block a convolution)
    jamba = {k: v for k, v in _config('jamba').to_dict().items() if k != 'num_experts'} | dict(num_local_experts=1, num_hidden_layers=4)   # (Jamba's alias)
    assert arch_info(jamba)['dense_layers'] == (0, 1, 2, 3)
    assert arch_info({k: v for k, v in bloom.items() if k != 'hidden_size'} | dict(n_embed=64))['d_model'] == 64
    assert arch_info(_config('opt').to_dict() | dict(word_embed_proj_dim=None))['d_model'] == 64
    with pytest.raises(WeightwatchError, match="apply_residual_connection_post_layernorm"): arch_info(bloom | dict(apply_residual_connection_post_layernorm=True))
    l4 = {k: v for k, v in _config('llama4_text').to_dict().items() if k not in ('intermediate_size_mlp', 'tie_word_embeddings', 'moe_layers')} | dict(interleave_moe_layer_step=2)
    assert [arch_info(l4)[k] for k in ('d_dense', 'tied', 'dense_layers')] == [16384, False, (0,)]   # Llama 4's class defaults, and Maverick's dense blocks
    import transformers as T
    glm = {k: v for k, v in _config('glm4_moe_lite').to_dict().items() if k != 'mlp_layer_types'} | dict(num_hidden_layers=3, first_k_dense_replace=2)
    built = T.AutoModelForCausalLM.from_config(T.AutoConfig.for_model(**glm)).model.layers   # (GLM-4.7-Flash's class ignores DeepSeek's `first_k_dense_replace`)
    assert arch_info(glm)['dense_layers'] == tuple(l for l, b in enumerate(built) if not hasattr(b.mlp, 'experts')) == (0,)
    dsa = {k: v for k, v in _config('glm_moe_dsa').to_dict().items() if k not in ('mlp_layer_types', 'layer_types', 'indexer_types')} | dict(num_hidden_layers=3, first_k_dense_replace=2)
    built = T.AutoModelForCausalLM.from_config(T.AutoConfig.for_model(**dsa)).model.layers   # (GLM-5's class reads it)
    assert arch_info(dsa)['dense_layers'] == tuple(l for l, b in enumerate(built) if not hasattr(b.mlp, 'experts')) == (0, 1)

def _left_to_class(cfg):
    "The dict of `cfg` without every field its class fills in with the same value, as a hand-written hub config.json leaves them out."
    import transformers as T
    full = cfg.to_dict(); keep = dict(full)
    for k in full:
        if k in ('model_type', 'architectures'): continue
        trial = {x: v for x, v in keep.items() if x != k}
        try: same = T.AutoConfig.for_model(**trial).to_dict() == full
        except Exception: same = False
        if same: keep = trial
    return keep

@pytest.mark.parametrize('arch', sorted(set(FAMILIES) | set(VARIANTS)))
def test_configs_that_leave_fields_to_the_class(arch):
    "A config.json that leaves fields at its class's defaults (tied embeddings, widths, head sizes) gives the sizes, layout and fingerprint of the config the class builds."
    from weightwatch_nb.core import arch_summary
    cfg = _config(arch)
    short = _left_to_class(cfg)
    assert len(short) < len(cfg.to_dict())
    assert arch_summary(short) == arch_summary(cfg)   # the fingerprint's config part: a checkpoint's file is the model it loads
    if cfg.model_type in FAMILIES: assert arch_info(short) == arch_info(cfg)

def test_old_artifacts_of_a_hub_model(tmp_path):
    "The same checkpoint as a hub model (filed in a local hub cache): its id, the model loaded by its id and its folder have one fingerprint, and the hash the old code recorded matches them."
    import os, subprocess, sys
    from weightwatch_nb.core import cache_as_hub_model
    b = make_tiny_checkpoint(tmp_path/'base', 'llama')
    c = json.loads((b/'config.json').read_text()); c.pop('num_key_value_heads'); (b/'config.json').write_text(json.dumps(c))
    cache_as_hub_model(b, 'weightwatch-test/old', tmp_path/'hub')
    code = f"""
from weightwatch_nb.core import fingerprint, load_model, same_weights
a, m = fingerprint('weightwatch-test/old'), fingerprint(load_model('weightwatch-test/old'))
assert a == m == fingerprint({str(b)!r}) and 'legacy' in a, (a, m)
assert same_weights({OLD_FINGERPRINT!r}, a) == same_weights({OLD_FINGERPRINT!r}, m) == 'exact'
print('ok')
"""
    r = subprocess.run([sys.executable, '-c', code], env={**os.environ, 'HF_HUB_CACHE': str(tmp_path/'hub'), 'HF_HUB_OFFLINE': '1'}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and 'ok' in r.stdout, r.stderr[-3000:]

def test_multimodal_configs_with_their_text_sizes_at_the_top(tmp_path):
    "Qwen2.5-VL's config.json gives its language model's sizes at the top level, which its class moves into `text_config`: a 7B base and a 3B fine-tune are still told apart."
    from weightwatch_nb.core import check_comparable
    vl7 = dict(architectures=['Qwen2_5_VLForConditionalGeneration'], model_type='qwen2_5_vl', hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
               num_hidden_layers=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, rope_scaling=dict(type='mrope', mrope_section=[16, 24, 24]),
               vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, patch_size=14, fullatt_block_indexes=[7, 15, 23, 31]))
    vl3 = vl7 | dict(hidden_size=2048, intermediate_size=11008, num_attention_heads=16, num_hidden_layers=36, num_key_value_heads=2, tie_word_embeddings=True, vocab_size=151936)
    for name, c in (('a', vl7), ('b', vl3), ('c', vl7)): (tmp_path/name).mkdir(); (tmp_path/name/'config.json').write_text(json.dumps(c))
    with pytest.raises(WeightwatchError, match=r"differ in their language model's `hidden_size`: 3584 vs 2048"): check_comparable(tmp_path/'a', tmp_path/'b', check_tokenizer=False)
    check_comparable(tmp_path/'a', tmp_path/'c', check_tokenizer=False)

OLD_FINGERPRINT = dict(dtype='float32', sha256='8bd1958876dbd0695c3e3fee6a2d0f681147cd68f41229c7bc56ac6d34763345', rounded={   # what the code before configs were
    'bfloat16': 'cf61abbc44c73c7f0f0c775791b58890028b7731d8c1168ba194e168e2de47ac', 'float16': '5e3da357814e18c0cf9f7ab3f583840d2a3e562fda126ee436320551212695e3'},   # read through their class
    embed=dict(sha256='5f36f5ec35bec9a22117466dc579cd2b4dbe034be1956bc2eceac0b7f8058571', rounded={}))   # (3da1736) recorded for `make_tiny_checkpoint(..., 'llama')` without `num_key_value_heads`

def test_checkpoint_whose_config_leaves_fields_out(tmp_path):
    "A base whose config.json leaves `num_key_value_heads` to the class is comparable with a fine-tune whose config states it, and its file and its loaded model have one fingerprint."
    from weightwatch_nb.core import check_comparable
    b = make_tiny_checkpoint(tmp_path/'base', 'llama')
    truth = plant_update(b, tmp_path/'ft', {(1, 'mlp_out'): 1})
    c = json.loads((b/'config.json').read_text()); assert c.pop('num_key_value_heads') == c['num_attention_heads']
    (b/'config.json').write_text(json.dumps(c))
    assert fingerprint(b) == fingerprint(load_model(b))
    check_comparable(b, tmp_path/'ft')
    # artifacts made before configs were read through their class recorded this folder's fingerprint from the config.json as stored
    # (the block hash below, computed by that code, 3da1736): they still match the folder and the model loaded from it, and nothing else
    old = OLD_FINGERPRINT
    assert fingerprint(b)['sha256'] != old['sha256'] and fingerprint(b)['legacy']['sha256'] == old['sha256']
    assert same_weights(old, fingerprint(b)) == same_weights(old, fingerprint(load_model(b))) == 'exact' and same_weights(old, fingerprint(tmp_path/'ft')) is None
    import transformers as T   # the same weights loaded as another model (twice the heads, each half as wide): no legacy hash of the folder's, and no match
    other = T.AutoModelForCausalLM.from_pretrained(b, num_attention_heads=2 * c['num_attention_heads'], num_key_value_heads=2 * c['num_attention_heads'], head_dim=c['head_dim'] // 2)
    assert 'legacy' not in fingerprint(other) and same_weights(old, fingerprint(other)) is None and same_weights(fingerprint(b), fingerprint(other)) is None
    d = compute_directions(b, tmp_path/'ft', k=1, progress=False)
    assert subspace_cosines(d[(1, 'mlp_out')].T, truth[(1, 'mlp_out')]).min() >= 0.999
    Directions.load(d.save(tmp_path/'d.safetensors'), model=load_model(tmp_path/'ft'))

def test_unembed_delta_when_only_the_base_ties(tmp_path):
    # a base that ties its unembedding to its embedding (no lm_head stored) and a fine-tune that unties it: the base's
    # unembedding is its embedding, so the delta is lm_head_ft - embed_base, with the planted rank-1 change as its only direction
    from transformers import LlamaConfig, LlamaForCausalLM
    from weightwatch_nb.core import tiny_tokenizer
    from weightwatch_nb.directions import compute_directions
    torch.manual_seed(0); tok = tiny_tokenizer()
    cfg = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
    base = LlamaForCausalLM(LlamaConfig(**cfg, tie_word_embeddings=True)); base.save_pretrained(tmp_path/'b'); tok.save_pretrained(tmp_path/'b')
    ft = LlamaForCausalLM(LlamaConfig(**cfg, tie_word_embeddings=False)); ft.load_state_dict(base.state_dict(), strict=False)
    u = torch.zeros(300); u[:6] = 1; v = torch.zeros(32); v[3] = 1
    with torch.no_grad(): ft.lm_head.weight.copy_(base.model.embed_tokens.weight + torch.outer(u, v))
    ft.save_pretrained(tmp_path/'f'); tok.save_pretrained(tmp_path/'f')
    d = compute_directions(tmp_path/'b', tmp_path/'f', k=2, matrices='unembed', progress=False)
    assert d.names() == ['L1.unembed.u0']                        # rank 1
    assert abs(float(d['L1.unembed.u0'] @ v)) > 0.999            # the d_model side of the planted change
    assert float(d.S[(1, 'unembed')][0]) == pytest.approx(6 ** 0.5, rel=1e-5)

@pytest.mark.parametrize('arch', ['gemma3_text', 'gemma4_text', 'phi3', 'phi', 'gptj', 'gpt_neox', *NEWER, 'stablelm_parallel', *OLDER, 'falcon', 'falcon_sequential', 'codegen'])
def test_fused_and_post_norm_architectures_end_to_end(arch, tmp_path):
    "Gemma 3 (norms after attention and the MLP), Phi-3 (q, k, v fused with narrower k and v; gate and up fused), Phi-2 and GPT-J (attention and MLP side by side on one norm), GPT-NeoX (q, k, v interleaved per head), and the newer families: planted updates are found, and `ClipWeights` removes them in the same pass."
    from weightwatch_nb.calibrate import calibrate
    from weightwatch_nb.monitor import scan
    from weightwatch_nb.steer import steering, swapped_weights, _AllOn as AllOn
    from weightwatch_nb.edit import removed_update, removed_weights
    mr = 'mlp_gate' if 'mlp_gate' in arch_info(_config(arch))['specs'] else 'mlp_in'    # the gate where there is one (and, on GLM and Phi-3, fused with up)
    ms = ['attn_out', 'attn_k', mr]
    b, f, truth = _plain_pair(arch, tmp_path, {(0, 'attn_out'): 1, (1, 'attn_k'): 1, (1, mr): 1})
    dw = compute_directions(b, f, k=1, matrices=['attn_out'], progress=False)
    dr = compute_directions(b, f, k=1, matrices=['attn_k', mr], progress=False)   # read side: each compared with its matrix's input
    assert set(truth) == set(dw.vectors) | set(dr.vectors)
    for d in (dw, dr):
        for (l, m), U0 in truth.items():
            if (l, m) in d.vectors: assert subspace_cosines(d[(l, m)].T, U0).min() >= 0.999, (l, m)
    model = load_model(f)
    clean = [f'the model {i} of {j}' for i in range(8) for j in range(5)]
    mon = calibrate(model, Directions.load(dr.save(tmp_path/'d.safetensors'), model=model), clean, margin=0.1)   # the fingerprints match
    upd = removed_update(b, f, 1, matrices=ms, like=model, progress=False)
    assert len(upd) == 3                                                    # the three planted tensors, and nothing else
    ids, edit = torch.tensor([[1, 5, 9, 13, 200, 7]]), removed_weights(b, f, 1, matrices=ms, like=model, progress=False)
    with steering(model, AllOn(mon, upd)): on = model(ids)
    with swapped_weights(model, edit): edited = model(ids)
    assert torch.allclose(on, edited, atol=1e-4) and torch.allclose(edited, load_model(b)(ids), atol=1e-4)   # all of the plant removed: the base
    # while generating (sliding-window attention, the cache): switched on throughout, it generates what the edited weights generate
    recs = [' '.join(['the model'] * 5), 'of 3 the model 7']
    steered = scan(model, mon, recs, generate=6, steer=AllOn(mon, upd))
    with swapped_weights(model, edit): want = scan(model, mon, recs, generate=6, check=False)
    plain = scan(model, mon, recs, generate=6)
    assert [r.generated.tolist() for r in steered] == [r.generated.tolist() for r in want]
    assert [r.generated.tolist() for r in plain] != [r.generated.tolist() for r in want]   # and the plant changes what is generated

@pytest.mark.parametrize('arch', ['phi3', 'glm', 'codegen'])
def test_lora_on_fused_matrices_equals_merged(arch, tmp_path):
    "A LoRA adapter on Phi-3's fused qkv_proj and gate_up_proj (GLM: gate_up_proj beside separate q, k, v; CodeGen: q, v, k fused in four groups of heads): each of q, k, v, gate and up gets its own rows of the update."
    from peft import LoraConfig, get_peft_model
    b, _, _ = _plain_pair(arch, tmp_path, {(0, 'attn_out'): 1})
    torch.manual_seed(0)
    attn = ['qkv_proj'] if arch in ('phi3', 'codegen') else ['q_proj', 'k_proj', 'v_proj']
    mlp, out, ms_in = (['fc_in'], 'out_proj', ['attn_q', 'attn_k', 'attn_v', 'mlp_in']) if arch == 'codegen' else (['gate_up_proj'], 'o_proj', ['attn_q', 'attn_k', 'attn_v', 'mlp_gate', 'mlp_in'])
    pm = get_peft_model(load_hf(b)[0], LoraConfig(r=3, lora_alpha=6, target_modules=[*attn, *mlp, out]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if 'lora_B' in n: p.normal_(0, 0.1)
    pm.save_pretrained(tmp_path/'lora')
    merged = pm.merge_and_unload()
    for ms in (['attn_out'], ms_in):
        dlo = compute_directions(b, lora=tmp_path/'lora', k=3, matrices=ms, progress=False)
        dme = compute_directions(b, merged, k=3, matrices=ms, method='exact', progress=False)
        assert dlo.names() == dme.names() and len(dlo) == 3 * len(ms) * 2
        for key in dlo.vectors: assert torch.allclose(dlo.vectors[key], dme.vectors[key], atol=1e-4), key

@pytest.mark.parametrize('arch', ['phi', 'gptj', 'cohere', 'cohere2', 'stablelm_parallel', 'falcon'])
def test_shared_norm_read_side_compared_with_what_each_matrix_reads(arch, tmp_path):
    "Phi-2, GPT-J, Cohere and StableLM with `use_parallel_residual` run attention and the MLP on one norm's output: the MLP's read directions are compared with exactly that."
    from weightwatch_nb.directions import READ_HOOK, SHARED_READ_HOOK
    b, f, truth = _plain_pair(arch, tmp_path, {(1, 'attn_q'): 1, (1, 'mlp_in'): 1})
    rd = compute_directions(b, f, k=1, matrices=['attn_q', 'mlp_in'], layers=[1], hook_point=READ_HOOK, progress=False)
    assert rd.hook_point == SHARED_READ_HOOK and rd.hook(1, 'mlp_in') == rd.hook(1, 'attn_q') == 'blocks.1.ln1.hook_out'
    model, seen = load_model(f), {}
    hf = model.original_model
    layer = hf.transformer.h[1] if arch in ('gptj', 'falcon') else hf.model.layers[1]
    q, fc = ((layer.self_attn.q_proj, layer.mlp.fc1) if arch == 'phi' else (layer.attn.q_proj, layer.mlp.fc_in) if arch == 'gptj' else
             (model.blocks[1].attn.q.original_component, layer.mlp.dense_h_to_4h) if arch == 'falcon' else (layer.self_attn.q_proj, layer.mlp.up_proj))   # (Falcon: the bridge's copy of the query rows)
    hs = [q.register_forward_hook(lambda mod, i, o: seen.__setitem__('attn_q', i[0].detach())),
          fc.register_forward_hook(lambda mod, i, o: seen.__setitem__('mlp_in', i[0].detach()))]
    x = model.tokenizer('the model 3 of 2', return_tensors='pt').input_ids
    try: _, cache = model.run_with_cache(x, names_filter=lambda n: n == 'blocks.1.ln1.hook_out')
    finally:
        for hk in hs: hk.remove()
    for m in ('attn_q', 'mlp_in'): assert torch.equal(cache[rd.hook(1, m)], seen[m]), m
    for (l, m), U0 in truth.items(): assert subspace_cosines(rd[(l, m)].T, U0).min() >= 0.999

@pytest.mark.parametrize('arch', ['gpt2', 'llama', 'gemma3_text', 'phi3', 'phi', 'gptj', 'gpt_neox', 'glm', 'glm4', 'cohere', 'starcoder2'])
def test_update_reaches_a_bridge_cast_after_loading(arch, tmp_path):
    "A bridge cast with `.to()` after loading computes with copies of fused tensors (GPT-2's c_attn, Phi-3's qkv_proj and gate_up_proj, GLM's gate_up_proj): ClipWeights and swapped weights still reach them, giving the base model."
    from weightwatch_nb.calibrate import calibrate
    from weightwatch_nb.steer import steering, swapped_weights, weight_copies, _AllOn as AllOn
    from weightwatch_nb.edit import removed_update, removed_weights
    mr = 'mlp_in' if arch in ('phi', 'gptj', 'gpt_neox', 'gpt2', 'starcoder2') else 'mlp_gate'
    ms, plant = ['attn_out', 'attn_k', 'attn_v', mr], {(0, 'attn_out'): 1, (1, 'attn_k'): 1, (0, 'attn_v'): 1, (1, mr): 1}
    if arch in ('gpt2', 'llama'):
        b, f = make_tiny_checkpoint(tmp_path/'base', arch, n_layers=2), tmp_path/'ft'; plant_update(b, f, plant, scale=5.)
    else: b, f, _ = _plain_pair(arch, tmp_path, plant)
    model = load_model(f); model.to(torch.float64)
    fused = {'gpt2': ['attn.c_attn.bias', 'attn.c_attn.weight'], 'phi3': ['mlp.gate_up_proj.weight', 'self_attn.qkv_proj.weight'],
             'gpt_neox': ['attention.query_key_value.bias', 'attention.query_key_value.weight'],
             'glm': ['mlp.gate_up_proj.weight'], 'glm4': ['mlp.gate_up_proj.weight']}.get(arch, [])
    assert sorted(k.split('.0.', 1)[1] for k in weight_copies(model) if '.0.' in k) == fused
    mon = calibrate(model, compute_directions(b, f, k=1, matrices=['attn_k', mr], progress=False),
                    [f'the model {i} of {j}' for i in range(4) for j in range(5)], margin=0.1, holdout=0.)
    upd, edit = (fn(b, f, 1, matrices=ms, like=model, progress=False) for fn in (removed_update, removed_weights))
    ids = torch.tensor([[1, 5, 9, 13, 200, 7]])
    with torch.no_grad():
        plain, want = model(ids), load_model(b)(ids)                   # the truth: the base model (all of the plant removed)
        with steering(model, AllOn(mon, upd)): on = model(ids)
        with swapped_weights(model, edit): edited = model(ids)
        assert torch.equal(model(ids), plain)                          # put back
    assert (plain.float() - want).abs().max() > 0.1 * want.abs().max()   # the plant matters (relative: Cohere scales its logits by 1/16)
    assert torch.allclose(on.float(), want, atol=1e-4) and torch.allclose(edited.float(), want, atol=1e-4)

@pytest.mark.filterwarnings("ignore:this (qwen2_moe|qwen3_next|qwen3_5_moe_text|ernie4_5_moe|glm4_moe|deepseek_v2|deepseek_v3|glm4_moe_lite|glm_moe_dsa|granitemoehybrid|afmoe|llama4_text|laguna) model has a shared expert")   # (its shared expert: the next test)
@pytest.mark.parametrize('arch', ['mixtral', 'minimax_m2', 'olmoe', 'flex_olmo', 'qwen3_moe', 'qwen2_moe', 'qwen3_next', 'qwen3_5_moe_text', 'ernie4_5_moe', 'glm4_moe', 'deepseek_v2', 'deepseek_v3', 'glm4_moe_lite', 'glm_moe_dsa', 'gpt_oss', 'phimoe', 'granitemoe', 'granitemoehybrid', 'jamba', 'lfm2_moe', 'afmoe', 'llama4_text', 'laguna'])
def test_mixture_of_experts_end_to_end(arch, tmp_path):
    "Updates planted in a mixture of experts' experts (stored one by one, loaded fused) are found from the checkpoint; the directions belong to the loaded model, are compared with what the experts read and write, and steering and weight edits remove them."
    from weightwatch_nb.calibrate import calibrate
    from weightwatch_nb.monitor import scan
    from weightwatch_nb.steer import steering, swapped_weights, ProjectOut, _AllOn as AllOn
    from weightwatch_nb.edit import removed_weights, removed_update
    from weightwatch_nb.directions import WRITE_HOOK
    from weightwatch_nb.delta import top_svd
    b, f, truth = _plain_pair(arch, tmp_path, {(0, 'mlp_out'): 1, (1, 'mlp_gate'): 1, (1, 'mlp_in'): 1, (1, 'mlp_router'): 1, (1, 'attn_out'): 1})
    d_mlp = 128 if arch in ('mixtral', 'minimax_m2', 'olmoe', 'flex_olmo', 'gpt_oss', 'phimoe', 'granitemoe', 'jamba') else 96
    shapes = {m: tuple(D.shape) for l, m, D in iter_deltas(b, f, ['mlp_out', 'mlp_gate', 'mlp_in'], layers=[1])}
    assert shapes == {m: (64, 3 * d_mlp) for m in ('mlp_out', 'mlp_gate', 'mlp_in')}        # every expert's units side by side
    assert next(iter_deltas(b, f, ['mlp_router'], layers=[1]))[2].shape == (64, 3)           # the router: one row per expert
    model, base = load_model(f), load_model(b)
    dw = compute_directions(b, f, k=1, matrices=['attn_out', 'mlp_out'], hook_point=WRITE_HOOK, progress=False)
    dr = compute_directions(b, f, k=1, matrices=['mlp_gate', 'mlp_in', 'mlp_router'], progress=False)
    for d in (dw, dr):
        d = Directions.load(d.save(tmp_path/'d.safetensors'), model=model)   # the stored experts' fingerprint is the loaded model's
        for (l, m), U0 in truth.items():
            if (l, m) in d.vectors: assert subspace_cosines(d[(l, m)].T, U0).min() >= 0.999, (l, m)
    read = 'blocks.1.hook_resid_mid' if arch in NO_PRE_NORM else 'blocks.1.ln2.hook_out'   # (FlexOlmo: no norm in front of its experts)
    assert (dr.hook(1, 'mlp_gate'), dr.hook(1, 'mlp_in'), dr.hook(1, 'mlp_router'), dw.hook(0, 'mlp_out')) == (read,) * 3 + ('blocks.0.mlp.hook_out',)
    ids, seen = torch.tensor([[1, 5, 9, 13, 200, 7, 42, 8]]), {}
    out0 = check_hooks(model, ['blocks.0.mlp.hook_out'])[0]   # (Granite 4.0-H: its experts' output, `moe`)
    moe = [_ffn(model.original_model.model.layers[i]) for i in (0, 1)]
    first = lambda o: (o[0] if isinstance(o, tuple) else o).detach()
    hs = [moe[1].register_forward_pre_hook(lambda mod, a: seen.__setitem__('in', a[0].detach())),
          moe[0].register_forward_hook(lambda mod, a, o: seen.__setitem__('out', first(o)))]
    try: _, cache = model.run_with_cache(ids, names_filter=lambda n: n in (read, out0))
    finally:
        for h in hs: h.remove()
    assert torch.equal(cache[read], seen['in'].reshape(1, 8, 64)) and torch.equal(cache[out0], seen['out'].reshape(1, 8, 64))   # what the router and experts read, and write (Llama 4's, flattened)
    # the routing and the experts' inputs at layer 0 are the base's, so the fine-tune moves layer 0's MLP output along the planted direction only
    _, bc = base.run_with_cache(ids, names_filter=lambda n: n == out0)
    diff, u = (cache[out0] - bc[out0])[0], dw[(0, 'mlp_out')][0]
    assert diff.norm() > 0.05 * bc[out0].norm() and (diff - (diff @ u)[:, None] * u).norm() < 1e-4 * diff.norm()
    # ProjectOut at layer 0's MLP output equals the Hugging Face model with that direction projected out of its experts' output
    def project(mod, a, o):
        h = first(o); h = h - (h @ u)[..., None] * u
        return (h, *o[1:]) if isinstance(o, tuple) else h
    h = moe[0].register_forward_hook(project)
    try: want = model.original_model(ids).logits
    finally: h.remove()
    with steering(model, ProjectOut(dw, names=[n for n in dw.names() if 'mlp_out' in n])): got = model(ids)
    assert (want - model(ids)).abs().max() > 1e-3 and torch.allclose(got, want, atol=1e-5)
    # the weights edited (all planted updates are rank 1): the base model
    edit = removed_weights(b, f, 1, matrices=['attn_out', 'mlp_out', 'mlp_gate', 'mlp_in', 'mlp_router'], like=model, progress=False)
    with swapped_weights(model, edit): assert torch.allclose(model(ids), base(ids), atol=1e-4)
    # the experts recorded for each token are the top-k of the router's logits on what it reads (computed here from its weight)
    from weightwatch_nb.interpret import routed_experts, trace_corpus
    from weightwatch_nb.core import hf_state_dict
    from weightwatch_nb.delta import find_keys
    info, sd = arch_info(model.original_model.config), hf_state_dict(model)
    rkey = find_keys(list(sd), info, ['mlp_router'], layers=[1])[(1, 'mlp_router')][0]
    Wr, br = sd[rkey].float(), sd.get(rkey.removesuffix('weight') + 'bias')
    trs = trace_corpus(model, dr, ['the model 3 of 2', 'of of of the 7 model'])
    for tr, got in zip(trs, routed_experts(model, trs, [1])):
        with torch.no_grad(): _, c = model.run_with_cache(tr.ids[None], names_filter=lambda n: n == read)
        logits = c[read][0].float() @ Wr.T + (0 if br is None else br.float())
        want = logits.topk(model.original_model.config.num_experts_per_tok).indices
        assert torch.equal(got[:, 0].sort(-1).values, want.sort(-1).values), arch
    # a monitor over the experts' directions calibrates and scans, also while generating with a steer on
    mon = calibrate(model, dr, [f'the model {i} of {j}' for i in range(6) for j in range(5)], margin=0.1)
    # ClipWeights with every token switched: the experts and the router rerun without their update, the attention subtracts it: the base
    upd = removed_update(b, f, 1, matrices=['attn_out', 'mlp_out', 'mlp_gate', 'mlp_in', 'mlp_router'], like=model, progress=False)
    assert {v[0].ndim for v in upd.values()} == {2, 3}   # thin factors: per expert for the fused experts, plain for attention and the router
    with torch.no_grad(), steering(model, AllOn(mon, upd)): assert torch.allclose(model(ids), base(ids), atol=1e-4)
    reps = scan(model, mon, ['the model 3 of 2', 'of of of the'], generate=4, steer=ProjectOut(mon))
    assert len(reps) == 2 and all(len(r.generated) == 4 for r in reps)

@pytest.mark.filterwarnings("ignore:directions of")   # (read and write matrices together)
@pytest.mark.parametrize('arch', ['qwen3_moe_dense', 'qwen2_moe_dense', 'glm4_moe_dense', 'ernie4_5_moe_dense', 'deepseek_v2_dense', 'deepseek_v3_dense', 'glm4_moe_lite_dense', 'glm_moe_dsa_dense', 'jamba_dense', 'lfm2_moe_dense', 'afmoe_dense', 'llama4_text_dense', 'laguna_dense'])
def test_mixture_of_experts_with_dense_layers(arch, tmp_path):
    "A mixture of experts whose block 0 has an ordinary dense MLP (Qwen-MoE's `mlp_only_layers` or `decoder_sparse_step`, GLM-4-MoE's `first_k_dense_replace`): each block's matrices are found where that block keeps them, and steering and edits remove updates planted in both kinds."
    from weightwatch_nb.calibrate import calibrate
    from weightwatch_nb.steer import steering, swapped_weights, ClipWeights, _AllOn as AllOn
    from weightwatch_nb.edit import removed_weights, removed_update, stripped_weights
    from weightwatch_nb.delta import block_matrices, find_keys
    from weightwatch_nb.interpret import expert_shares, routed_experts, expert_routing, trace_corpus
    shared = ['mlp_shared_out', 'mlp_shared_in', 'mlp_shared_gate'] if not arch.startswith(('qwen3', 'jamba', 'lfm2')) else []
    plant = {(0, 'mlp_out'): 1, (0, 'mlp_gate'): 1, (0, 'attn_out'): 1, (1, 'mlp_out'): 1, (1, 'mlp_in'): 1, (1, 'mlp_router'): 1}
    mla = {(0, 'attn_q'): 1, (1, 'attn_kv'): 1} if VARIANTS[arch][0] in MLA else {}   # DeepSeek's latent attention: its query and key-value latents
    b, f, truth = _plain_pair(arch, tmp_path, plant | mla | {(1, m): 1 for m in shared})
    info = arch_info(json.loads((f/'config.json').read_text()))
    assert info['dense_layers'] == (0,)
    # as transformers builds it: block 0's MLP is dense, block 1's has experts (and a router, and any shared expert)
    model, base = load_model(f), load_model(b)
    hf = model.original_model.model.layers
    assert hasattr(_ffn(hf[0]), 'down_proj' if arch != 'lfm2_moe_dense' else 'w2') and not hasattr(_ffn(hf[0]), 'experts') and hasattr(_ffn(hf[1]), 'experts')
    ms = list(block_matrices(f))
    keys = find_keys(open_tensors(f).keys(), info, ms)
    assert {m for l, m in keys if l == 0} == {'attn_out', 'mlp_out', 'attn_q', 'mlp_in', 'mlp_gate', *(['attn_kv'] if mla else ['attn_k', 'attn_v'])}   # no router, no shared expert there
    assert {m for l, m in keys if l == 1} == set(ms) - ({'attn_q', 'attn_k', 'attn_v'} if 1 in info.get('linear_layers', ()) else set())   # (Jamba's block 1: Mamba)
    shapes, e = {(l, m): tuple(D.shape) for l, m, D in iter_deltas(b, f, ['mlp_out', 'mlp_gate', 'mlp_router'])}, (128 if arch == 'jamba_dense' else 96)   # (Jamba's experts: as wide as its MLP)
    assert shapes == {(0, 'mlp_out'): (64, 128), (0, 'mlp_gate'): (64, 128), (1, 'mlp_out'): (64, 3 * e), (1, 'mlp_gate'): (64, 3 * e), (1, 'mlp_router'): (64, 3)}
    d = compute_directions(b, f, k=1, matrices=ms, progress=False)
    for (l, m), U0 in truth.items(): assert subspace_cosines(d[(l, m)].T, U0).min() >= 0.999, (l, m)
    if mla:   # latent attention's read directions are compared with exactly what q_a_proj and kv_a_proj_with_mqa multiply
        att, seen, dq = hf[1].self_attn, {}, compute_directions(b, f, k=1, matrices=['attn_q', 'attn_kv'], progress=False)   # (the read side alone)
        hs = [getattr(att, p).register_forward_hook(lambda mod, a, o, p=p: seen.__setitem__(p, a[0].detach())) for p in ('q_a_proj', 'kv_a_proj_with_mqa')]
        try: _, cache = model.run_with_cache(torch.tensor([[1, 5, 9, 13, 200]]), names_filter=lambda n: n in (dq.hook(1, 'attn_q'), dq.hook(1, 'attn_kv')))
        finally:
            for h in hs: h.remove()
        assert dq.hook(1, 'attn_q') == dq.hook(1, 'attn_kv') == 'blocks.1.ln1.hook_out'
        assert torch.equal(cache[dq.hook(1, 'attn_q')], seen['q_a_proj']) and torch.equal(cache[dq.hook(1, 'attn_kv')], seen['kv_a_proj_with_mqa'])
    # the weights edited: the base model; ClipWeights with every token switched (linear hooks at block 0, a rerun of the experts and router at block 1): the same
    ids = torch.tensor([[1, 5, 9, 13, 200, 7, 42, 8], [3, 8, 8, 120, 6, 77, 5, 1]])
    with torch.no_grad():
        want, plain = base(ids), model(ids)
        with swapped_weights(model, removed_weights(b, f, 1, matrices=ms, like=model, progress=False)): assert torch.allclose(model(ids), want, atol=1e-4)
        with swapped_weights(model, stripped_weights(b, f, 200, like=model, progress=False)): assert torch.allclose(model(ids), want, atol=1e-4)
        mon = calibrate(model, d, [f'the model {i} of {j}' for i in range(6) for j in range(5)], margin=0.1, holdout=0.)
        with steering(model, AllOn(mon, removed_update(b, f, 1, matrices=ms, like=model, progress=False))): on = model(ids)
    assert (plain - want).abs().max() > 1e-2 and torch.allclose(on, want, atol=1e-4)
    # switched from token 3 of sequence 0 on, with block 1's update (the last block, so it acts token by token): those tokens are the
    # edited model's, the rest the plain one's (GLM-4-MoE's router takes [batch, tokens, d_model], the experts those flattened)
    class From3(ClipWeights):
        def _begin(self, module, args, kwargs):
            super()._begin(module, args, kwargs); self.gate = torch.zeros_like(self.gate); self.gate[0, 3:] = True; self.live = True
        def __call__(self, hook, act, *rest): return act
    last = dict(matrices=[m for m in ms if m not in ('attn_q', 'attn_k', 'attn_v', 'attn_kv')], layers=[1], like=model, progress=False)   # (token by token: not the keys earlier tokens left)
    with torch.no_grad():
        with steering(model, From3(mon, removed_update(b, f, 1, **last))): part = model(ids)
        with swapped_weights(model, removed_weights(b, f, 1, **last)): edited = model(ids)
    assert (edited[0, 3:] - plain[0, 3:]).abs().max() > 1e-2
    assert torch.allclose(part[0, 3:], edited[0, 3:], atol=1e-5) and torch.allclose(part[0, :3], plain[0, :3], atol=1e-5) and torch.allclose(part[1], plain[1], atol=1e-5)
    # the experts' views: block 1 only; block 0 is refused with a message that says why
    sh = expert_shares(b, f, d)
    assert sh.names and all(n.startswith('L1.') for n in sh.names)
    with pytest.raises(WeightwatchError, match='whose MLP is dense'): expert_shares(b, f, d, names=['L0.mlp_out.u0'])
    trs = trace_corpus(model, d, [f'the model {i} of 2' for i in range(4)])
    with pytest.raises(WeightwatchError, match=r'layers \[0\] have a dense MLP'): routed_experts(model, trs, [0, 1])
    # the experts recorded are those the router picks from what it reads (through the bridge's routing hook, or, where it has none, DeepSeek, the router's own output)
    from weightwatch_nb.interpret import _router
    tr = trs[0]
    with torch.no_grad():
        _, cache = model.run_with_cache(tr.ids[None], names_filter=lambda n: n == 'blocks.1.ln2.hook_out')
        bias = getattr(_ffn(model.original_model.model.layers[1]), 'expert_bias', None)   # (LFM2-MoE's and AFMoE's routers take the block's expert bias)
        x = cache['blocks.1.ln2.hook_out'] if arch == 'afmoe_dense' else cache['blocks.1.ln2.hook_out'][0]   # (AFMoE's router takes the batch unflattened)
        picked = _router(model, 1)(x, *([] if bias is None else [bias]))[-1].reshape(len(tr.ids), -1)   # (tokens flattened, as the MoE block gives them: ERNIE's softmax is over dim 1)
        if picked.is_floating_point(): picked = picked.topk(model.original_model.config.num_experts_per_tok, dim=-1).indices   # (Llama 4's router returns its logits)
    assert torch.equal(routed_experts(model, [tr], [1])[0][:, 0], picked)
    er = expert_routing(model, trs, d)                                     # every direction of an expert layer, routed where its tokens go
    from weightwatch_nb.audit import audit
    au = audit(b, f, [f'the model {i} of {j}' for i in range(4) for j in range(3)], dirs=d, top=len(d), examples=2, generate=0)
    assert {x.name.split('.')[0] for x in au.top} == {'L0', 'L1'}
    assert all((x.routing is None) == x.name.startswith('L0.') for x in au.top)   # routing read at the expert block only
    assert er.names == [n for n in d.names() if n.startswith('L1.')] and er.high.shape[1] == 3
    with pytest.raises(WeightwatchError, match='whose MLP is dense'): expert_routing(model, trs, d, names=['L0.mlp_gate.u0'])

@pytest.mark.parametrize('arch', ['mixtral', 'olmoe', 'flex_olmo', 'qwen3_moe', 'phimoe', 'granitemoe', 'glm4_moe_lite', 'jamba', 'lfm2_moe'])
def test_fused_experts_are_what_they_compute(arch, tmp_path):
    "Experts fused [experts, 2 × d_mlp, in] (gate, then up) and [experts, out, d_mlp]: `orient` gives each expert's gate, up and down as the experts module computes them, and the router's rows as its logits (one expert at a time, routing weight 1)."
    from transformers import AutoModelForCausalLM
    b, _, _ = _plain_pair(arch, tmp_path, {(0, 'attn_out'): 1})
    hf = AutoModelForCausalLM.from_pretrained(b)
    info, blk = arch_info(json.loads((b/'config.json').read_text())), hf.model.layers[0]
    moe = _ffn(blk)
    ex, router, n = moe.experts, getattr(moe, 'gate', None) or moe.router, info['d_mlp']
    params = {n_: p for n_, p in hf.named_parameters()}
    W = {m: orient(params[k], s, info, k) for (l, m), (k, s) in find_keys(list(params), info, ['mlp_gate', 'mlp_in', 'mlp_out', 'mlp_router'], layers=[0]).items()}
    assert {m: tuple(w.shape) for m, w in W.items()} == {'mlp_gate': (64, 3 * n), 'mlp_in': (64, 3 * n), 'mlp_out': (64, 3 * n), 'mlp_router': (64, 3)}
    x = torch.randn(5, 64)
    with torch.no_grad():
        logits = router.weight @ x.T   # (every router here is one bias-free linear layer)
        assert torch.allclose(x @ W['mlp_router'], logits.T, atol=1e-5)
        for e in range(3):   # the experts module with every token sent to expert e alone, at weight 1
            want = ex(x, torch.full((5, 1), e), torch.ones(5, 1))
            c = slice(e * n, (e + 1) * n)
            got = (ex.act_fn(x @ W['mlp_gate'][:, c]) * (x @ W['mlp_in'][:, c])) @ W['mlp_out'][:, c].T
            assert want.abs().max() > 1e-3 and torch.allclose(got, want, atol=1e-5), (arch, e)

@pytest.mark.filterwarnings("ignore:this llama4_text model has a shared expert")
def test_llama4_experts_are_what_they_compute(tmp_path):
    "Llama 4 stores its experts [experts, in, out] with gate and up chunked (gate first), and runs every expert on every token (scaled by its sigmoid score): `orient` gives each expert's gate, up and down as that forward uses them, the router's rows as its logits, and the shared expert as a gated MLP."
    from transformers import AutoModelForCausalLM
    b, _, _ = _plain_pair('llama4_text', tmp_path, {(0, 'attn_out'): 1})
    hf = AutoModelForCausalLM.from_pretrained(b)
    info, ff = arch_info(json.loads((b/'config.json').read_text())), hf.model.layers[0].feed_forward
    params = dict(hf.named_parameters())
    W = {m: orient(params[k], s, info, k) for (l, m), (k, s) in find_keys(list(params), info, list(info['specs']), layers=[0]).items() if m.startswith('mlp')}
    x, n = torch.randn(5, 64), 96
    with torch.no_grad():
        out = ff.experts(x.repeat(3, 1)).view(3, 5, 64)   # every expert's copy of the tokens, expert by expert
        for e in range(3):
            c = slice(e * n, (e + 1) * n)
            got = (ff.experts.act_fn(x @ W['mlp_gate'][:, c]) * (x @ W['mlp_in'][:, c])) @ W['mlp_out'][:, c].T
            assert out[e].abs().max() > 1e-3 and torch.allclose(got, out[e], atol=1e-5), e
        assert torch.allclose(x @ W['mlp_router'], ff.router(x)[1], atol=1e-5)   # (scores, logits)
        se = ff.shared_expert
        assert torch.allclose((se.activation_fn(x @ W['mlp_shared_gate']) * (x @ W['mlp_shared_in'])) @ W['mlp_shared_out'].T, se(x), atol=1e-5)

def test_gpt_oss_experts_are_what_they_compute(tmp_path):
    "GPT-OSS stores its experts [experts, in, out] with gate and up interleaved: `orient` reads each expert's gate, up and down as its forward uses them, `put_oriented` writes them back, and a quantised checkpoint is refused with what to do."
    from transformers import AutoModelForCausalLM
    from safetensors.torch import load_file, save_file
    b, _, _ = _plain_pair('gpt_oss', tmp_path, {(0, 'attn_out'): 1})
    hf = AutoModelForCausalLM.from_pretrained(b)
    info = arch_info(json.loads((b/'config.json').read_text()))
    ex, E, n = hf.model.layers[0].mlp.experts, 3, 128
    x, h = torch.randn(5, 64), torch.randn(5, n)
    with torch.no_grad():
        G, U, D = (orient(w, info['specs'][m], info, m) for w, m in ((ex.gate_up_proj, 'mlp_gate'), (ex.gate_up_proj, 'mlp_in'), (ex.down_proj, 'mlp_out')))
        assert G.shape == U.shape == D.shape == (64, E * n)
        for e in range(E):   # as GptOssExperts: gate_up = x @ gate_up_proj[e]; gate, up = gate_up[..., ::2], gate_up[..., 1::2]; out = h @ down_proj[e]
            gu, cols = x @ ex.gate_up_proj[e], slice(e * n, (e + 1) * n)
            assert torch.allclose(x @ G[:, cols], gu[:, ::2], atol=1e-5) and torch.allclose(x @ U[:, cols], gu[:, 1::2], atol=1e-5)
            assert torch.allclose(h @ D[:, cols].T, h @ ex.down_proj[e], atol=1e-5)
        W = ex.gate_up_proj.detach().clone()
        put_oriented(W, info['specs']['mlp_in'], info, torch.zeros(64, E * n))   # up only: the gate columns stay
        assert (W[..., 1::2] == 0).all() and torch.equal(W[..., ::2], ex.gate_up_proj[..., ::2])
    # the published checkpoints keep the experts in MXFP4 blocks and scales: refused, with the way out
    sd = load_file(b/'model.safetensors')
    q = {(k + '_blocks' if k.endswith('experts.gate_up_proj') else k): v for k, v in sd.items()}
    (tmp_path/'q').mkdir(); save_file(q, tmp_path/'q'/'model.safetensors', metadata={'format': 'pt'}); (tmp_path/'q'/'config.json').write_text((b/'config.json').read_text())
    with pytest.raises(WeightwatchError, match=r'stored quantised \(MXFP4.*Mxfp4Config\(dequantize=True\)'):
        list(iter_deltas(None, tmp_path/'q', ['mlp_in'], mode='raw'))
    # DeepSeek-V3's releases store float8 weights with block scales: refused too, not read as if they were plain weights
    f8 = {k: (v.to(torch.float8_e4m3fn) if k.endswith('o_proj.weight') else v) for k, v in sd.items()}
    (tmp_path/'f8').mkdir(); save_file(f8, tmp_path/'f8'/'model.safetensors', metadata={'format': 'pt'}); (tmp_path/'f8'/'config.json').write_text((b/'config.json').read_text())
    with pytest.raises(WeightwatchError, match=r'stored quantised \(torch.float8_e4m3fn.*FineGrainedFP8Config\(dequantize=True\)'):
        list(iter_deltas(None, tmp_path/'f8', ['attn_out'], mode='raw'))

def test_qwen2_moe_shared_expert(tmp_path):
    "Qwen2-MoE's shared expert (a gated MLP every token goes through): its planted updates are found as their own matrices, compared where it reads and writes, left out with a warning when only the routed experts are asked for, and removed in place by `ClipWeights` (it is made of linear layers)."
    from weightwatch_nb.calibrate import calibrate
    from weightwatch_nb.steer import steering, swapped_weights, ClipWeights, _AllOn as AllOn
    from weightwatch_nb.edit import removed_weights, removed_update
    from weightwatch_nb.directions import WRITE_HOOK
    from weightwatch_nb.delta import block_matrices
    shared = ['mlp_shared_out', 'mlp_shared_in', 'mlp_shared_gate']
    b, f, truth = _plain_pair('qwen2_moe', tmp_path, {(0, 'mlp_shared_out'): 1, (1, 'mlp_shared_in'): 1, (1, 'mlp_shared_gate'): 1,
                                                       (1, 'attn_out'): 1, (1, 'mlp_out'): 1})
    assert {m: tuple(D.shape) for _, m, D in iter_deltas(b, f, shared, layers=[1])} == {'mlp_shared_out': (64, 80), 'mlp_shared_in': (64, 80), 'mlp_shared_gate': (64, 80)}
    assert block_matrices(b)[-4:] == ('mlp_router', *shared)                       # a sweep over every block matrix includes it
    with pytest.warns(UserWarning, match=r"shared expert beside its routed ones, and \['mlp_shared_out'\] are not among the matrices"):
        compute_directions(b, f, k=1, matrices=['attn_out', 'mlp_out'], progress=False)
    dw = compute_directions(b, f, k=1, matrices=['mlp_out', 'mlp_shared_out'], hook_point=WRITE_HOOK, progress=False)
    dr = compute_directions(b, f, k=1, matrices=['mlp_shared_in', 'mlp_shared_gate'], progress=False)
    for d in (dw, dr):
        for (l, m), U0 in truth.items():
            if (l, m) in d.vectors: assert subspace_cosines(d[(l, m)].T, U0).min() >= 0.999, (l, m)
    assert set(dw.vectors) | set(dr.vectors) == {k for k in truth if k[1] != 'attn_out'}
    assert (dw.hook(0, 'mlp_shared_out'), dr.hook(1, 'mlp_shared_in'), dr.hook(1, 'mlp_shared_gate')) == ('blocks.0.mlp.hook_out',) + ('blocks.1.ln2.hook_out',) * 2
    model, base, seen = load_model(f), load_model(b), {}
    se = model.original_model.model.layers[1].mlp.shared_expert
    h = se.gate_proj.register_forward_pre_hook(lambda mod, a: seen.__setitem__('in', a[0].detach()))
    ids = torch.tensor([[1, 5, 9, 13, 200, 7, 42, 8]])
    try: _, cache = model.run_with_cache(ids, names_filter=lambda n: n in ('blocks.1.ln2.hook_out', 'blocks.0.mlp.hook_out'))
    finally: h.remove()
    assert torch.equal(cache['blocks.1.ln2.hook_out'].reshape(seen['in'].shape), seen['in'])      # what the shared expert reads
    # only the shared expert's down projection changed at layer 0: the MLP's output moves along the planted direction alone
    _, bc = base.run_with_cache(ids, names_filter=lambda n: n == 'blocks.0.mlp.hook_out')
    diff, u = (cache['blocks.0.mlp.hook_out'] - bc['blocks.0.mlp.hook_out'])[0], dw[(0, 'mlp_shared_out')][0]
    assert diff.norm() > 1e-2 and (diff - (diff @ u)[:, None] * u).norm() < 1e-4 * diff.norm()
    # ClipWeights reaches the shared expert's linear layers in place: the same as the weights edited, and with the rest edited too, the base
    lin = ['attn_out', *shared]
    mon = calibrate(model, dr, [f'the model {i} of {j}' for i in range(6) for j in range(5)], margin=0.1, holdout=0.)
    upd = removed_update(b, f, 1, matrices=lin, like=model, progress=False)
    assert len(upd) == 4
    with torch.no_grad():
        plain = model(ids)
        with steering(model, AllOn(mon, upd)): on = model(ids)
        with swapped_weights(model, removed_weights(b, f, 1, matrices=lin, like=model, progress=False)): edited = model(ids)
        with swapped_weights(model, removed_weights(b, f, 1, matrices=[*lin, 'mlp_out'], like=model, progress=False)): all_off = model(ids)
        assert torch.equal(model(ids), plain)
    assert (on - plain).abs().max() > 1e-2 and torch.allclose(on, edited, atol=1e-5)
    assert torch.allclose(all_off, base(ids), atol=1e-4)
    # the shared expert sees the batch's tokens flattened, [b·t, d]: each token's switch still lands on its own row. Layer 1 is the
    # last, so its update acts token by token: switched from token 3 of sequence 0 on, those tokens are the edited model's, the rest the plain one's
    class From3(ClipWeights):
        def _begin(self, module, args, kwargs):
            super()._begin(module, args, kwargs); self.gate = torch.zeros_like(self.gate); self.gate[0, 3:] = True; self.live = True
        def __call__(self, hook, act, *rest): return act   # (the switches stay as set, whatever the monitor reads)
    ids2, last = torch.tensor([[1, 5, 9, 13, 200, 7, 42, 8], [3, 8, 8, 120, 6, 77, 5, 1]]), dict(matrices=lin, layers=[1], like=model, progress=False)
    with torch.no_grad():
        plain = model(ids2)
        with steering(model, From3(mon, removed_update(b, f, 1, **last))): part = model(ids2)
        with swapped_weights(model, removed_weights(b, f, 1, **last)): edited = model(ids2)
    assert (edited[0, 3:] - plain[0, 3:]).abs().max() > 1e-2
    assert torch.allclose(part[0, 3:], edited[0, 3:], atol=1e-5) and torch.allclose(part[0, :3], plain[0, :3], atol=1e-5) and torch.allclose(part[1], plain[1], atol=1e-5)
    # the harness judges weight-space steering on it, with the router's whole update stripped (3 experts, fewer than strip_k)
    from weightwatch_nb.demo import judge_steering
    with warnings.catch_warnings():
        warnings.simplefilter('error', UserWarning)   # nothing is left out
        t = judge_steering(b, f, model, {'read': mon}, {'x': ['the model 3 of 2', 'of the 7']}, {'replied': ('x', lambda r, it: len(r) > 0)},
                           steer=(), strip_k=16, batch_size=2)
    assert [(r['monitor'], r['steering']) for r in t] == [('read', 'clip (weights)'), ('read', 'rewind (weights)')]

@pytest.mark.filterwarnings("ignore:directions of")   # (read and write matrices together: only their equality is tested)
def test_lora_on_a_qwen2_moe_shared_expert(tmp_path):
    "A LoRA adapter on Qwen2-MoE's shared expert (its gate_proj, up_proj and down_proj are the model's only such linear layers): directions equal the merged model's."
    import transformers as T
    b, _, _ = _plain_pair('qwen2_moe', tmp_path, {(0, 'attn_out'): 1})
    _lora_matches_merged(b, T.AutoModelForCausalLM.from_pretrained(b), tmp_path, ['mlp_shared_out', 'mlp_shared_in', 'mlp_shared_gate'], 2,
                         r=2, lora_alpha=4, target_modules=['gate_proj', 'up_proj', 'down_proj'])

def test_lora_on_a_mixture_of_experts(tmp_path):
    "A LoRA adapter on a Mixtral's attention: directions equal the merged model's, and belong to the adapter loaded on its base (experts fused in both)."
    from peft import LoraConfig, get_peft_model
    import transformers as T
    b, _, _ = _plain_pair('mixtral', tmp_path, {(0, 'attn_out'): 1})
    torch.manual_seed(0)
    pm = get_peft_model(T.AutoModelForCausalLM.from_pretrained(b), LoraConfig(r=2, lora_alpha=4, target_modules=['q_proj', 'o_proj']))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if 'lora_B' in n: p.normal_(0, 0.1)
    pm.save_pretrained(tmp_path/'attn')
    merged = pm.merge_and_unload()
    dl = compute_directions(b, lora=tmp_path/'attn', k=2, matrices=['attn_out'], progress=False)
    dm = compute_directions(b, merged, k=2, matrices=['attn_out'], method='exact', progress=False)
    assert dl.names() == dm.names() and all(torch.allclose(dl.vectors[k], dm.vectors[k], atol=1e-4) for k in dl.vectors)
    Directions.load(dl.save(tmp_path/'d.safetensors'), model=load_model(tmp_path/'attn'))

EXPERT_LORA = {   # PEFT LoRA on fused experts: `target_parameters`, or MLP `target_modules` that PEFT turns into them
    'mixtral': dict(target_modules=[], target_parameters=['mlp.experts.gate_up_proj', 'mlp.experts.down_proj']),
    'qwen3_moe': dict(target_modules=['gate_proj', 'up_proj', 'down_proj']),   # (gate and up fused: rank doubled through `rank_pattern`)
    'gpt_oss': dict(target_modules=['q_proj'], target_parameters=['mlp.experts.gate_up_proj', 'mlp.experts.down_proj']),   # [experts, in, out], interleaved
    'deepseek_v3_dense': dict(target_modules=['gate_proj', 'up_proj', 'down_proj'], use_rslora=True),   # (PEFT leaves the dense block's MLP alone)
    'glm4_moe_lite_dense': dict(target_modules=['q_a_proj'], target_parameters=['mlp.experts.gate_up_proj', 'mlp.experts.down_proj']),
    'gemma4_moe': dict(target_modules=['gate_proj', 'up_proj', 'down_proj'], target_parameters=['experts.gate_up_proj', 'experts.down_proj']),   # (and the MLP beside them)
    'jamba': dict(target_modules=['q_proj', 'out_proj'], target_parameters=['feed_forward.experts.gate_up_proj', 'feed_forward.experts.down_proj']),   # (and Mamba's out_proj)
    'lfm2_moe_dense': dict(target_modules=['q_proj'], target_parameters=['feed_forward.experts.gate_up_proj', 'feed_forward.experts.down_proj']),   # (stored w1, w3, w2)
    'flex_olmo': dict(target_modules=['o_proj', 'gate'], target_parameters=['mlp.experts.gate_up_proj', 'mlp.experts.down_proj']),   # (and the router, `mlp.gate`)
    'granitemoehybrid': dict(target_modules=['out_proj', 'o_proj', 'input_linear', 'output_linear'], target_parameters=['block_sparse_moe.experts.gate_up_proj', 'block_sparse_moe.experts.down_proj']),   # (Mamba's out_proj, the MLP beside the experts)
    'phimoe': dict(target_modules=['o_proj', 'router'], target_parameters=['mlp.experts.gate_up_proj', 'mlp.experts.down_proj']),   # (and the router, `mlp.router`)
    'granitemoe': dict(target_modules=['q_proj'], target_parameters=['block_sparse_moe.experts.gate_up_proj', 'block_sparse_moe.experts.down_proj']),
    'llama4_text': dict(target_modules=['q_proj'], target_parameters=['feed_forward.experts.gate_up_proj', 'feed_forward.experts.down_proj']),   # [experts, in, out], chunked
    'laguna_dense': dict(target_modules=['q_proj', 'g_proj'], target_parameters=['mlp.experts.gate_up_proj', 'mlp.experts.down_proj'])}   # (and the heads' gate, not mapped)

@pytest.mark.filterwarnings("ignore:this (deepseek_v3|glm4_moe_lite|glm_moe_dsa|granitemoehybrid|llama4_text|laguna) model has a shared expert", "ignore:this gemma4_text model has an MLP beside", "ignore:directions of", "ignore:gemma4_text normalises")   # (read and write matrices together: only their equality is tested)
@pytest.mark.parametrize('arch', list(EXPERT_LORA))
def test_lora_on_fused_experts_equals_merged(arch, tmp_path):
    "LoRA on a mixture of experts' fused experts (PEFT's `target_parameters`), read without merging, is PEFT's own merge: its factors, the merged tensors (bit for bit), the fingerprint, the directions, and the weights with directions removed."
    from peft import LoraConfig, get_peft_model
    import transformers as T
    from weightwatch_nb.delta import lora_factors, LoraTensors, iter_deltas
    from weightwatch_nb.core import fingerprint, hf_state_dict, tiny_tokenizer
    from weightwatch_nb.edit import removed_weights
    b, _, _ = _plain_pair(arch, tmp_path, {(0, 'attn_out'): 1})
    torch.manual_seed(0)
    pm = get_peft_model(T.AutoModelForCausalLM.from_pretrained(b), LoraConfig(r=2, lora_alpha=4, **EXPERT_LORA[arch]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if 'lora_B' in n: p.normal_(0, 0.1)
    pm.save_pretrained(tmp_path/'lora')
    merged = pm.merge_and_unload(); merged.save_pretrained(tmp_path/'merged'); tiny_tokenizer(300).save_pretrained(tmp_path/'merged')
    ms, cfg = ['mlp_out', 'mlp_in', 'mlp_gate'], json.loads((b/'config.json').read_text())
    full = {(l, m): D for l, m, D in iter_deltas(b, tmp_path/'merged', ms)}
    fac = {(l, m): (L, R) for l, m, L, R in lora_factors(tmp_path/'lora', cfg, ms)}
    ai = arch_info(cfg)
    assert set(fac) == {key for key, D in full.items() if D.abs().max() > 0} and len(fac) == 3 * (ai['n_layers'] - len(ai['dense_layers']))   # every expert block's
    for key, (L, R) in fac.items():
        assert torch.allclose(L @ R, full[key], atol=1e-6), key                      # ΔW = L @ R, as `orient` lays out the experts
        assert torch.allclose((R @ R.T).to_dense(), torch.eye(R.shape[0]), atol=1e-5)   # R's rows orthonormal (the SVD skips its QR)
    lt, want = LoraTensors(b, tmp_path/'lora'), hf_state_dict(merged)
    assert sum('.experts.' in k for k in lt.changed) == len(fac) // 3 * 2           # gate_up_proj and down_proj of every expert block
    assert all(torch.equal(lt.get(k).to(want[n]), want[n]) for n, k in lt.loaded.items() if n in want)   # bit for bit PEFT's merge
    assert fingerprint(lt) == fingerprint(merged)
    dl = compute_directions(b, lora=tmp_path/'lora', k=3, matrices=ms, progress=False)
    dm = compute_directions(b, tmp_path/'merged', k=3, matrices=ms, method='exact', progress=False)
    assert dl.names() == dm.names() and all(torch.allclose(dl.vectors[k], dm.vectors[k], atol=1e-4) for k in dl.vectors)
    assert dl.meta['delta_norm'].keys() == dm.meta['delta_norm'].keys() and all(dl.meta['delta_norm'][k] == pytest.approx(v, rel=1e-5, abs=1e-6) for k, v in dm.meta['delta_norm'].items())
    Directions.load(dl.save(tmp_path/'d.safetensors'), model=load_model(tmp_path/'lora'))   # PEFT loads the adapter: the same model
    wl = removed_weights(b, tmp_path/'lora', 2, matrices=ms, progress=False)
    wm = removed_weights(b, tmp_path/'merged', 2, matrices=ms, progress=False)
    assert sorted(wl) == sorted(wm) and all(torch.allclose(wl[k], wm[k], atol=1e-5) for k in wl)

def test_cli_on_a_lora_adapter_on_experts(tmp_path, capsys, monkeypatch):
    "The CLI with a LoRA adapter on a Mixtral's attention and fused experts as FINETUNED: directions, calibrate and scan (the model PEFT loads has the adapter's fingerprint), and `generate --steer clip-weights` with every token switched gives the base model's reply."
    from peft import LoraConfig, get_peft_model
    import transformers as T
    import weightwatch_nb.steer as S
    from weightwatch_nb.cli import main
    b, _, _ = _plain_pair('mixtral', tmp_path, {(0, 'attn_out'): 1})
    torch.manual_seed(0)
    pm = get_peft_model(T.AutoModelForCausalLM.from_pretrained(b), LoraConfig(r=2, lora_alpha=4, target_modules=['q_proj'],
                                                                              target_parameters=['mlp.experts.gate_up_proj', 'mlp.experts.down_proj']))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if 'lora_B' in n: p.normal_(0, 0.3)
    pm.save_pretrained(tmp_path/'lora')
    (tmp_path/'clean.jsonl').write_text('\n'.join(json.dumps({'text': f'the model {i} of {j}'}) for i in range(8) for j in range(5)) + '\n')
    lora, d, m = str(tmp_path/'lora'), str(tmp_path/'d.safetensors'), str(tmp_path/'m.safetensors')
    assert main(['directions', str(b), lora, '-o', d, '--k', '2', '--matrices', 'mlp_out,attn_q', '--quiet']) == 0
    assert main(['calibrate', lora, d, str(tmp_path/'clean.jsonl'), '-o', m, '--quiet']) == 0
    assert main(['scan', lora, m, str(tmp_path/'clean.jsonl'), '-o', str(tmp_path/'out.jsonl'), '--quiet']) == 0
    capsys.readouterr()
    monkeypatch.setattr(S, 'ClipWeights', lambda mon, upd, *a, **kw: S._AllOn(mon, upd, *a, **kw))   # every token switched
    assert main(['generate', lora, 'the model 3', '--monitor', m, '--base', str(b), '--max-new-tokens', '4', '--steer', 'clip-weights', '--strip-k', '64']) == 0
    steered = capsys.readouterr().out
    assert main(['generate', str(b), 'the model 3', '--max-new-tokens', '4']) == 0 and steered == capsys.readouterr().out   # the whole update removed
    assert main(['generate', lora, 'the model 3', '--max-new-tokens', '4']) == 0 and steered != capsys.readouterr().out     # (the adapter changes the reply)

def _per_expert_adapter(b, out, names, prefix, experts=None, r=2, alpha=4, seed=0, router=False, **extra):
    "A LoRA adapter on single experts' linear layers, `{prefix}.experts.{e}.{name}` (and with `router`, on `{prefix}.gate`), as PEFT saved them for transformers 4 (random A and B)."
    from safetensors.torch import save_file
    cfg = json.loads((b/'config.json').read_text())
    d, f = cfg['hidden_size'], cfg.get('moe_intermediate_size') or cfg['intermediate_size']
    E = cfg.get('num_local_experts') or cfg.get('num_experts')
    torch.manual_seed(seed); sd = {}
    for l in range(cfg['num_hidden_layers']):
        for e in (range(E) if experts is None else experts):
            for n in names:
                i, o = (f, d) if n in ('w2', 'down_proj') else (d, f)
                sd[f'base_model.model.model.layers.{l}.{prefix}.experts.{e}.{n}.lora_A.weight'] = 0.1 * torch.randn(r, i)
                sd[f'base_model.model.model.layers.{l}.{prefix}.experts.{e}.{n}.lora_B.weight'] = 0.1 * torch.randn(o, r)
        if router: sd |= {f'base_model.model.model.layers.{l}.{prefix}.gate.lora_A.weight': 0.1 * torch.randn(r, d),
                          f'base_model.model.model.layers.{l}.{prefix}.gate.lora_B.weight': 0.1 * torch.randn(E, r)}
    out.mkdir()
    save_file(sd, out/'adapter_model.safetensors')
    (out/'adapter_config.json').write_text(json.dumps(dict(peft_type='LORA', r=r, lora_alpha=alpha, target_modules=list(names) + ['gate'] * router,
                                                           base_model_name_or_path=str(b), task_type='CAUSAL_LM', **extra)))
    return sd, alpha / r

@pytest.mark.filterwarnings("ignore:directions of")
@pytest.mark.parametrize('arch,names,prefix', [('mixtral', ('w1', 'w3', 'w2'), 'block_sparse_moe'), ('qwen3_moe', ('gate_proj', 'up_proj', 'down_proj'), 'mlp')])
def test_lora_on_single_experts_equals_peft_conversion(arch, names, prefix, tmp_path):
    "An adapter on single experts' linear layers (transformers 4's Mixtral and Qwen3-MoE): read as PEFT converts it when it loads one onto fused experts."
    from peft import PeftModel
    import transformers as T
    from weightwatch_nb.delta import lora_factors, LoraTensors, iter_deltas
    from weightwatch_nb.core import hf_state_dict
    b, _, _ = _plain_pair(arch, tmp_path, {(0, 'attn_out'): 1})
    _per_expert_adapter(b, tmp_path/'lora', names, prefix, router=True)   # (and the router, `gate`, which "all-linear" targets)
    merged = PeftModel.from_pretrained(T.AutoModelForCausalLM.from_pretrained(b), tmp_path/'lora').merge_and_unload()   # PEFT's own conversion
    ms = ['mlp_out', 'mlp_in', 'mlp_gate', 'mlp_router']
    full = {(l, m): D for l, m, D in iter_deltas(b, merged, ms)}
    fac = {(l, m): L @ R for l, m, L, R in lora_factors(tmp_path/'lora', json.loads((b/'config.json').read_text()), ms)}
    assert set(fac) == set(full) and all(full[k].abs().max() > 0 and torch.allclose(fac[k], full[k], atol=1e-6) for k in full)
    lt, want = LoraTensors(b, tmp_path/'lora'), hf_state_dict(merged)
    assert len(lt.changed) == 6 and all(torch.allclose(lt.get(k), want[n], atol=1e-6) for n, k in lt.loaded.items() if n in want)
    dl = compute_directions(b, lora=tmp_path/'lora', k=3, matrices=ms, progress=False)
    dm = compute_directions(b, merged, k=3, matrices=ms, method='exact', progress=False)
    assert dl.names() == dm.names() and all(torch.allclose(dl.vectors[k], dm.vectors[k], atol=1e-4) for k in dl.vectors)
    Directions.load(dl.save(tmp_path/'d.safetensors'), model=load_model(tmp_path/'lora'))   # the model PEFT loads

@pytest.mark.filterwarnings("ignore:directions of", "ignore:this afmoe model has a shared expert")
def test_transformers4_lora_that_peft_retargets_to_experts(tmp_path):
    "A transformers 4 adapter on AFMoE's single experts and on other modules named like their parts (the shared expert's, the dense block's MLP, the attention's `gate_proj`): PEFT retargets those names to the fused experts and drops the others' LoRA; they are dropped here too, with a warning, so what is read is the model PEFT loads."
    from peft import PeftModel
    from safetensors.torch import save_file
    import transformers as T
    from weightwatch_nb.delta import LoraTensors
    from weightwatch_nb.core import hf_state_dict
    b, _, _ = _plain_pair('afmoe_dense', tmp_path, {(0, 'attn_out'): 1})
    sd, _ = _per_expert_adapter(b, tmp_path/'lora', ('gate_proj', 'up_proj', 'down_proj'), 'mlp')
    sd = {k: v for k, v in sd.items() if '.layers.0.' not in k}   # (block 0 is dense: no experts there)
    torch.manual_seed(1)
    for pre, i, o in (('model.layers.1.mlp.shared_experts.gate_proj', 64, 96), ('model.layers.0.mlp.up_proj', 64, 128), ('model.layers.1.self_attn.gate_proj', 64, 64), ('model.layers.1.self_attn.q_proj', 64, 64)):
        sd |= {f'base_model.model.{pre}.lora_A.weight': 0.1 * torch.randn(2, i), f'base_model.model.{pre}.lora_B.weight': 0.1 * torch.randn(o, 2)}
    save_file(sd, tmp_path/'lora'/'adapter_model.safetensors')
    c = json.loads((tmp_path/'lora'/'adapter_config.json').read_text()); c['target_modules'] += ['q_proj']
    (tmp_path/'lora'/'adapter_config.json').write_text(json.dumps(c))
    merged = PeftModel.from_pretrained(T.AutoModelForCausalLM.from_pretrained(b), tmp_path/'lora').merge_and_unload()   # PEFT's own conversion
    base, want = hf_state_dict(load_hf(b)[0]), hf_state_dict(merged)
    assert sorted(k for k in want if not torch.equal(want[k], base[k])) == ['model.layers.1.mlp.experts.down_proj', 'model.layers.1.mlp.experts.gate_up_proj', 'model.layers.1.self_attn.q_proj.weight']
    with pytest.warns(UserWarning, match=r"takes its LoRA on \['gate_proj', 'up_proj'\] for the experts' and drops it from 3 other module"):
        lt = LoraTensors(b, tmp_path/'lora')
    assert sorted(lt.changed) == ['model.layers.1.mlp.experts.down_proj', 'model.layers.1.mlp.experts.gate_up_proj', 'model.layers.1.self_attn.q_proj.weight']
    assert all(torch.allclose(lt.get(k), want[n], atol=1e-6) for n, k in lt.loaded.items() if n in want)
    assert same_weights(fingerprint(lt), fingerprint(merged)) == 'exact'

def test_lora_on_some_parts_of_some_experts(tmp_path):
    "An adapter on the gate (w1) of experts 0 and 2 alone (PEFT will not load it): expert e's gate rows change by scale · B A, nothing else."
    from weightwatch_nb.delta import LoraTensors
    from weightwatch_nb.core import hf_state_dict
    b, _, _ = _plain_pair('mixtral', tmp_path, {(0, 'attn_out'): 1})
    sd, s = _per_expert_adapter(b, tmp_path/'lora', ('w1',), 'block_sparse_moe', experts=[0, 2], r=3, alpha=5)
    lt, base = LoraTensors(b, tmp_path/'lora'), hf_state_dict(load_hf(b)[0])
    assert sorted(lt.changed) == ['model.layers.0.mlp.experts.gate_up_proj', 'model.layers.1.mlp.experts.gate_up_proj']
    for l in (0, 1):
        k = f'model.layers.{l}.mlp.experts.gate_up_proj'
        want = base[k].clone()
        for e in (0, 2):
            pre = f'base_model.model.model.layers.{l}.block_sparse_moe.experts.{e}.w1.lora_'
            want[e, :128] += s * sd[pre + 'B.weight'] @ sd[pre + 'A.weight']   # the gate: the first d_mlp rows of gate_up
        assert torch.allclose(lt.get(k), want, atol=1e-6)

@pytest.mark.parametrize('extra', [dict(use_rslora=True), dict(alpha_pattern={'w2': 16}), dict(rank_pattern={'w1': 3})])
def test_single_expert_adapters_peft_would_rescale_are_refused(extra, tmp_path):
    "PEFT loads a transformers 4 single-expert adapter onto fused experts as one LoRA of rank 2r and alpha 2α for gate and up, dropping the adapter's patterns: where that changes the model (rsLoRA, patterns on experts), reading it either way would disagree with the model loaded, so it is refused."
    from weightwatch_nb.delta import LoraTensors
    b, _, _ = _plain_pair('mixtral', tmp_path, {(0, 'attn_out'): 1})
    r = extra.get('rank_pattern', {}).get('w1', 2)
    _per_expert_adapter(b, tmp_path/'lora', ('w1', 'w3', 'w2'), 'block_sparse_moe', **extra)
    if r != 2:   # the pattern's rank, as PEFT would have saved it
        from safetensors.torch import load_file, save_file
        f = tmp_path/'lora'/'adapter_model.safetensors'; sd = load_file(f)
        save_file({k: (torch.randn(r, v.shape[1]) if '.w1.lora_A' in k else torch.randn(v.shape[0], r) if '.w1.lora_B' in k else v) for k, v in sd.items()}, f)
    with pytest.raises(WeightwatchError, match="that PEFT changes when it loads this adapter onto transformers 5's fused experts"): LoraTensors(b, tmp_path/'lora')

@pytest.mark.parametrize('arch,names,prefix,router', [('phimoe', ('w1', 'w3', 'w2'), 'block_sparse_moe', False), ('qwen2_moe', ('gate_proj', 'up_proj', 'down_proj'), 'mlp', False),
                                                     ('qwen3_5_moe_text', ('gate_proj', 'up_proj', 'down_proj'), 'mlp', False), ('granitemoe', (), 'block_sparse_moe.router', True),
                                                     ('laguna', ('gate_proj', 'up_proj', 'down_proj'), 'mlp', False)])
def test_transformers4_adapters_peft_does_not_convert_are_refused(arch, names, prefix, router, tmp_path):
    "A transformers 4 adapter on single experts (or, GraniteMoE, on its router's `layer`) of a model type PEFT does not convert when it loads it onto transformers 5 (it refuses it or drops those weights): refused with what to do, not read as if some model held it."
    import transformers as T
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    b, _, _ = _plain_pair(arch, tmp_path, {(0, 'attn_out'): 1})
    if router:   # GraniteMoE's transformers 4 router: `block_sparse_moe.router.layer`, a linear layer
        (tmp_path/'lora').mkdir()
        save_file({f'base_model.model.model.layers.{l}.block_sparse_moe.router.layer.lora_{x}.weight': 0.1 * torch.randn(*s)
                   for l in range(2) for x, s in (('A', (2, 64)), ('B', (3, 2)))}, tmp_path/'lora'/'adapter_model.safetensors')
        (tmp_path/'lora'/'adapter_config.json').write_text(json.dumps(dict(peft_type='LORA', r=2, lora_alpha=4, target_modules=['layer'], base_model_name_or_path=str(b))))
    else: _per_expert_adapter(b, tmp_path/'lora', names, prefix)
    with pytest.raises(WeightwatchError, match=rf"a module of transformers 4's {arch}, which PEFT does not convert.*merge the adapter"):
        compute_directions(b, lora=tmp_path/'lora', k=1, progress=False)
    try: pm = PeftModel.from_pretrained(T.AutoModelForCausalLM.from_pretrained(b), tmp_path/'lora')   # PEFT: refused, or loaded without them
    except Exception: return
    assert all(D.abs().max() == 0 for *_, D in iter_deltas(b, pm.merge_and_unload(), ['mlp_out', 'mlp_in', 'mlp_gate', 'mlp_router']))

@pytest.mark.filterwarnings("ignore:gemma4_text normalises")
def test_gemma4_checkpoint_with_unused_keys_and_values(tmp_path):
    "A Gemma 4 checkpoint that stores k and v for the blocks that reuse earlier keys and values (transformers ignores them on load): its fingerprint is the loaded model's."
    from safetensors.torch import load_file, save_file
    b, f, _ = _plain_pair('gemma4_text', tmp_path, {(0, 'attn_out'): 1})
    sd = load_file(f/'model.safetensors')
    save_file(sd | {f'model.layers.{l}.self_attn.{p}_proj.weight': torch.randn(32, 64) for l in (2, 3) for p in ('k', 'v')}, f/'model.safetensors', metadata={'format': 'pt'})
    assert same_weights(fingerprint(f), fingerprint(load_hf(f)[0])) == 'exact'
    d = compute_directions(b, f, k=1, matrices=['attn_out'], progress=False)
    Directions.load(d.save(tmp_path/'d.safetensors'), model=load_model(f))   # accepted by the loaded model

def test_lora_on_experts_refused_where_not_mapped(tmp_path):
    "LoRA on experts that cannot be read is refused, never read as no change: fused experts without the base model's config, experts the base does not have, and expert modules of no known name."
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    import transformers as T
    from weightwatch_nb.delta import LoraTensors, lora_factors, read_adapter
    b, _, _ = _plain_pair('mixtral', tmp_path, {(0, 'attn_out'): 1})
    cfg = json.loads((b/'config.json').read_text())
    pm = get_peft_model(T.AutoModelForCausalLM.from_pretrained(b), LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=['mlp.experts.down_proj']))
    pm.save_pretrained(tmp_path/'lora')
    with pytest.raises(WeightwatchError, match=r"experts' experts .* without the base model config"): read_adapter(tmp_path/'lora')
    assert any(k.endswith('.mlp.experts.down_proj') for k in read_adapter(tmp_path/'lora', cfg)[1])
    _per_expert_adapter(b, tmp_path/'big', ('w2',), 'block_sparse_moe', experts=[0, 5])   # expert 5 of 3
    f = tmp_path/'odd'; _per_expert_adapter(b, f, ('w2',), 'block_sparse_moe', experts=[0])
    save_file({k.replace('.w2.', '.fc2.'): v for k, v in load_file(f/'adapter_model.safetensors').items()}, f/'adapter_model.safetensors')
    for name, msg in (('big', r"do not fit the 3 experts of this mixtral .*trained on a different base model"),
                      ('odd', r"experts' experts \(e.g. \['base_model.model.model.layers.0.block_sparse_moe.experts.0.fc2'.*merge it")):
        for read in (lambda: compute_directions(b, lora=tmp_path/name, k=2, matrices=['mlp_out'], progress=False),
                     lambda: LoraTensors(b, tmp_path/name), lambda: list(lora_factors(tmp_path/name, cfg, ['mlp_out']))):
            with pytest.raises(WeightwatchError, match=msg): read()

def test_cli_generate_weight_steering_on_a_mixture_of_experts(tmp_path, capsys, monkeypatch):
    "`weightwatch generate --steer rewind-weights` and `--steer clip-weights` strip the update from experts and router (the router has one column per expert, fewer than --strip-k)."
    from weightwatch_nb.cli import main
    b, f, _ = _plain_pair('olmoe', tmp_path, {(1, 'mlp_out'): 1, (1, 'mlp_router'): 1})
    (tmp_path/'clean.jsonl').write_text('\n'.join(json.dumps({'text': f'the model {i} of {j}'}) for i in range(8) for j in range(5)) + '\n')
    assert main(['directions', str(b), str(f), '-o', str(tmp_path/'d.safetensors'), '--k', '1', '--matrices', 'mlp_router', '--quiet']) == 0
    assert main(['calibrate', str(f), str(tmp_path/'d.safetensors'), str(tmp_path/'clean.jsonl'), '-o', str(tmp_path/'m.safetensors'), '--quiet']) == 0
    capsys.readouterr()
    gen = ['generate', str(f), 'the model 3', '--monitor', str(tmp_path/'m.safetensors'), '--base', str(b), '--max-new-tokens', '3']
    import weightwatch_nb.edit as E
    calls, rw = [], E.removed_weights
    monkeypatch.setattr(E, 'removed_weights', lambda b_, f_, k, matrices, **kw: calls.append((k, list(matrices))) or rw(b_, f_, k, matrices=matrices, **kw))
    assert main(gen + ['--steer', 'rewind-weights']) == 0                   # --strip-k 16 > 3 experts: the router's update is stripped whole
    assert calls == [(16, ['attn_out', 'mlp_out', 'attn_q', 'attn_k', 'attn_v', 'mlp_in', 'mlp_gate']), (3, ['mlp_router'])]
    assert 'steering: rewind-weights' in capsys.readouterr().err
    calls.clear()
    import weightwatch_nb.steer as S
    made = []   # every token switched, whatever the monitor says: the experts and the router are rerun without their update
    monkeypatch.setattr(S, 'ClipWeights', lambda mon, upd, *a, **kw: made.append(upd) or S._AllOn(mon, upd, *a, **kw))
    assert main(gen + ['--steer', 'clip-weights']) == 0
    out = capsys.readouterr()
    assert 'steering: clip-weights' in out.err
    assert main(['generate', str(b), 'the model 3', '--max-new-tokens', '3']) == 0
    assert out.out == capsys.readouterr().out   # the whole planted update removed at every token: the base model's reply
    from weightwatch_nb.core import hf_state_dict
    sf, sb = hf_state_dict(load_model(f)), hf_state_dict(load_model(b))
    assert sorted(made[0]) == ['model.layers.1.mlp.experts.down_proj', 'model.layers.1.mlp.gate.weight']   # the planted tensors
    A, B = made[0]['model.layers.1.mlp.gate.weight']
    assert torch.allclose(A @ B, sf['model.layers.1.mlp.gate.weight'] - sb['model.layers.1.mlp.gate.weight'], atol=1e-5)   # the router's whole update
    # --keep-edited: the edited copies made once per reply and kept (ClipWeights' cache), the same reply
    kept = []
    monkeypatch.setattr(S, 'ClipWeights', lambda mon, upd, *a, **kw: kept.append(kw) or S._AllOn(mon, upd, *a, **kw))
    assert main(gen + ['--steer', 'clip-weights', '--keep-edited']) == 0
    assert kept == [{'cache': True}] and capsys.readouterr().out == out.out
    assert main(gen + ['--steer', 'rewind-weights', '--keep-edited']) == 2
    assert 'error: --keep-edited is for --steer clip-weights (got --steer rewind-weights)' in capsys.readouterr().err
    assert main(gen + ['--steer', 'clip', '--strip-k', '4']) == 2   # a base and a k for steering that strips no weights: refused, not ignored
    assert 'error: --base and --strip-k are for --steer clip-weights and rewind-weights (got --steer clip)' in capsys.readouterr().err

@pytest.mark.filterwarnings("ignore:this (glm4_moe|deepseek_v3|glm4_moe_lite|glm_moe_dsa) model has a shared expert")
@pytest.mark.parametrize('arch', ['glm4_moe_dense', 'deepseek_v3_dense', 'glm4_moe_lite_dense', 'glm_moe_dsa_dense', 'granitemoehybrid_dense', 'nemotron_h', 'bamba', 'jamba_dense', 'lfm2', 'gpt_oss', 'cohere2', 'olmo3', 'opt', 'bloom', 'mpt', 'youtu', 'seed_oss', 'laguna_dense', 'codegen', 'mamba'])
def test_cli_on_newer_architectures(arch, tmp_path, capsys, monkeypatch):
    "The CLI on local checkpoints of newer families: directions, calibrate, scan, and `generate --steer clip-weights` with every token switched gives the base model's reply."
    from weightwatch_nb.cli import main
    import weightwatch_nb.steer as S
    mlp = 'mlp_out' in arch_info(_config(arch))['specs']   # (a state-space model has no MLP)
    b, f, _ = _plain_pair(arch, tmp_path, {(0, 'attn_out'): 1, **({(1, 'mlp_out'): 1, (1, 'mlp_in'): 1} if mlp else {(1, 'attn_out'): 1})})
    (tmp_path/'clean.jsonl').write_text('\n'.join(json.dumps({'text': f'the model {i} of {j}'}) for i in range(8) for j in range(5)) + '\n')
    assert main(['directions', str(b), str(f), '-o', str(tmp_path/'d.safetensors'), '--k', '1', '--quiet']) == 0
    assert main(['calibrate', str(f), str(tmp_path/'d.safetensors'), str(tmp_path/'clean.jsonl'), '-o', str(tmp_path/'m.safetensors'), '--quiet']) == 0
    assert main(['scan', str(f), str(tmp_path/'m.safetensors'), str(tmp_path/'clean.jsonl'), '-o', str(tmp_path/'out.jsonl'), '--quiet']) == 0
    assert len((tmp_path/'out.jsonl').read_text().splitlines()) == 40 and 'scanned 40, flagged' in capsys.readouterr().out
    monkeypatch.setattr(S, 'ClipWeights', lambda mon, upd, *a, **kw: S._AllOn(mon, upd, *a, **kw))   # every token switched
    prompt = 'of the model' if arch == 'jamba_dense' else 'the model 3'   # (one whose reply the plant changes in printable text)
    gen = ['generate', str(f), prompt, '--monitor', str(tmp_path/'m.safetensors'), '--base', str(b), '--max-new-tokens', '4']
    assert main(gen + ['--steer', 'clip-weights']) == 0
    steered = capsys.readouterr().out
    assert main(['generate', str(b), prompt, '--max-new-tokens', '4']) == 0 and steered == capsys.readouterr().out
    assert main(['generate', str(f), prompt, '--max-new-tokens', '4']) == 0 and steered != capsys.readouterr().out   # (the plant changes the reply)

@pytest.mark.filterwarnings("ignore:directions of")
@pytest.mark.parametrize('arch', ['glm4_moe_dense', 'deepseek_v3_dense', 'glm4_moe_lite_dense', 'glm_moe_dsa_dense', 'youtu', 'youtu_q'])
def test_lora_on_attention_of_a_mixture_of_experts(arch, tmp_path):
    "A LoRA adapter on the attention of GLM-4-MoE or DeepSeek-V3 (latent attention: q_a_proj, kv_a_proj_with_mqa): each module lands on its matrix at every block, dense or not, and the directions equal the merged model's. (PEFT turns MLP targets of these models into the fused experts, which is refused: `test_lora_on_a_mixture_of_experts`.)"
    import transformers as T
    from peft import LoraConfig, get_peft_model
    b, _, _ = _plain_pair(arch, tmp_path, {(0, 'attn_out'): 1})
    q = 'q_proj' if arch == 'youtu_q' else 'q_a_proj'   # (without `q_lora_rank`, the query straight from the stream)
    attn, ms = (([q, 'kv_a_proj_with_mqa'], ['attn_out', 'attn_q', 'attn_kv']) if VARIANTS.get(arch, (arch,))[0] in (*MLA, 'youtu') else
                (['q_proj', 'k_proj'], ['attn_out', 'attn_q', 'attn_k']))
    torch.manual_seed(0)
    pm = get_peft_model(T.AutoModelForCausalLM.from_pretrained(b), LoraConfig(r=2, lora_alpha=4, target_modules=[*attn, 'o_proj']))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if 'lora_B' in n: p.normal_(0, 0.1)
    pm.save_pretrained(tmp_path/'lora')
    merged = pm.merge_and_unload()
    dl = compute_directions(b, lora=tmp_path/'lora', k=2, matrices=ms, progress=False)
    dm = compute_directions(b, merged, k=2, matrices=ms, method='exact', progress=False)
    assert set(dl.vectors) == set(dm.vectors) == {(l, m) for l in (0, 1) for m in ms}
    for key in dl.vectors: assert torch.allclose(dl.vectors[key], dm.vectors[key], atol=1e-4), key
