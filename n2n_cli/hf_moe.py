"""Dense to mixture of experts (``upcycle`` steps): every expert a copy of the dense MLP.

With the top-k weights renormalised to sum to one (Mixtral always; Qwen-MoE with
norm_topk_prob), identical experts give sum_k w_k MLP(x) = MLP(x) whatever the router picks, so
the MoE computes the dense function exactly for any router: zero (uniform softmax) or small
random. Qwen2-MoE's shared expert is scaled by sigmoid(gate . x); its gate is zeroed, so it adds
0.5 x shared(x): ``split`` puts a copy of the MLP there and halves the routed experts' down
projections (x/2 + x/2 = x exactly in floating point), ``zero`` zeroes its down projection.

Noise on the copies: the block output is sum over the k *selected* experts of w_e (D + N_e) h(x),
so noise cancels only if sum_{e in S} w_e N_e = 0 for every set S the router may pick. For k < E
that forces all N_e equal (swap one member of S), hence zero once they sum to zero: zero-sum
noise is exact only when every expert is selected with equal weight (top_k == experts and a
zero router: w_e = 1/E). Anything else is refused unless allow_approximate, and then measured.
"""

from __future__ import annotations

from dataclasses import replace

from .errors import StepError
from .hf import families
from .planner import Create, PlannedStep, Scale, TensorChange


def _class_name(arch_name: str, cls: str) -> str:
    i = arch_name.find("For")
    return cls + (arch_name[i:] if i > 0 else "Model")


def plan_upcycle(plan, index: int, entry) -> None:
    step = entry.upcycle
    a = plan.arch_after
    cfg = plan.config_out if plan.config_out is not None else plan.config
    mt = cfg.get("model_type")
    if a.experts:
        raise StepError(f"the model is already a mixture of experts ({a.experts} experts per layer)",
                        hint="Widen or deepen it instead.")
    fams = {f.name: f for f in families().values()}
    target = next((f for f in fams.values() if mt in (f.moe.get("upcycle") or {}).get("from", [])), None)
    if target is None:
        sources = sorted(t for f in fams.values() for t in (f.moe.get("upcycle") or {}).get("from", []) if t in families())
        raise StepError(f"model_type {mt!r} cannot be upcycled to a mixture of experts",
                        hint=f"n2n upcycles {', '.join(sources)}.")
    up, moe = target.moe["upcycle"], target.moe
    new_mt = (up.get("model_type") or {}).get(mt, target.model_types[0])
    cls = up["class"] if isinstance(up["class"], str) else up["class"][mt]
    E, k = step.experts, step.top_k
    with_shared = mt in (up.get("shared_from") or [])
    if step.shared_expert != "split" and not with_shared:  # (a recorded step holds every field: judge values)
        raise StepError(f"shared_expert: {new_mt} has no shared expert", hint="Drop shared_expert.",
                        flags={"shared_expert: ": "--shared-expert "})
    renorm_flag = moe.get("renormalize")
    if renorm_flag == "always" and not step.norm_topk_prob:
        raise StepError(f"norm_topk_prob: {new_mt} always renormalises the top-k weights", hint="Drop norm_topk_prob.",
                        flags={"norm_topk_prob: false": "--no-norm-topk-prob"})
    renorm = renorm_flag == "always" or step.norm_topk_prob

    # why the result would not compute the dense function (refused unless allow_approximate)
    inexact = []
    if not renorm and k < E:
        inexact.append(f"norm_topk_prob is false with top_k {k} < experts {E}: the selected experts' weights sum to "
                       "less than one, so the block output shrinks")
    if step.noise > 0 and not (k == E and step.router_init == "zero"):
        inexact.append(f"noise {step.noise:g} on the experts cancels only when every expert is selected with equal "
                       f"weight (top_k == experts and router_init zero); with top_k {k} of {E} experts"
                       + (" and a random router" if step.router_init != "zero" else "")
                       + " the selected experts' noise does not sum to zero")
    if inexact and not step.allow_approximate:
        raise StepError("upcycling cannot be exact: " + "; ".join(inexact),
                        hint="Add allow_approximate: true to the step to upcycle anyway; the deviation is measured "
                             "and reported, not judged.",
                        flags={"allow_approximate: true to the step": "--allow-approximate"})

    # per-layer attention types the target config can hold
    target_per_layer = target.config.get("per_layer") or []
    for name, values in a.per_layer.items():
        if name not in target_per_layer and len(set(values)) > 1:
            raise StepError(f"the model's '{name}' differ from layer to layer ({', '.join(sorted(set(values)))}), "
                            f"which a {new_mt} config cannot express")
    new_arch = replace(a, family=target, experts=E, top_k=k, shared=a.intermediate if with_shared else 0,
                       per_layer={n: v for n, v in a.per_layer.items() if n in target_per_layer}, dropped=())
    new_specs = new_arch.tensors()
    layer_key = a.prefix + a.family.layer
    src_names = a.block_names(a.family.block)
    dst_names = set(new_arch.block_names(target.block))
    recipes, shapes, dtypes, changes, unplaced = {}, {}, {}, [], []
    for key in plan.recipes:  # outside the blocks: same names
        if not key.startswith(layer_key.split("{")[0]):
            if key not in new_specs:
                unplaced.append(key)
            recipes[key], shapes[key], dtypes[key] = plan.recipes[key], plan.shapes[key], plan.dtypes[key]
    halve = with_shared and step.shared_expert == "split"
    for i in range(a.layers):
        head = layer_key.format(i=i)
        gate_src = head + next(iter(up["experts"]))
        for name in src_names:
            src = head + name
            if src not in plan.recipes:
                continue
            rec, shp, dt = plan.recipes[src], plan.shapes[src], plan.dtypes[src]
            placed = False
            if name in up["experts"]:
                tmpl = up["experts"][name]
                for e in range(E):
                    dst = head + tmpl.replace("{e}", str(e))
                    extra = []
                    if tmpl == up["down"] and (halve or step.noise > 0):
                        extra = [Scale(index, 0.5 if halve else 1.0, step.noise, f"{i}", e, E)]
                    recipes[dst], shapes[dst], dtypes[dst] = list(rec) + extra, shp, dt
                    changes.append(TensorChange(dst, shp, shp, f"expert {e}: copy of {name}" + (
                        " x 0.5 (the shared expert holds the other half)" if halve and extra else "") + (
                        f" + zero-sum noise {step.noise:g}" if step.noise > 0 and extra else "")))
                placed = True
            if with_shared and name in (up.get("shared") or {}):
                dst = head + up["shared"][name]
                if up["shared"][name] == up["shared_down"] and step.shared_expert == "zero":
                    recipes[dst] = [Create(index, shp, "const", 0.0)]
                    changes.append(TensorChange(dst, None, shp, "zero (shared expert off)"))
                else:
                    recipes[dst] = list(rec)
                    changes.append(TensorChange(dst, None, shp, f"shared expert: copy of {name}"))
                shapes[dst], dtypes[dst] = shp, dt
                placed = True
            if not placed:
                if name in dst_names:
                    recipes[src], shapes[src], dtypes[src] = rec, shp, dt
                else:
                    unplaced.append(src)
        if gate_src not in plan.recipes:
            continue
        hidden, dt = plan.shapes[gate_src][1], plan.dtypes[gate_src]
        router = head + up["router"]
        recipes[router] = [Create(index, (E, hidden), "normal" if step.router_init == "small" else "const",
                                  step.router_std if step.router_init == "small" else 0.0)]
        shapes[router], dtypes[router] = (E, hidden), dt
        changes.append(TensorChange(router, None, (E, hidden), "router: zero (uniform softmax)" if step.router_init ==
                                    "zero" else f"router: N(0, {step.router_std:g}^2)"))
        if with_shared:
            sg = head + up["shared_gate"]
            recipes[sg], shapes[sg], dtypes[sg] = [Create(index, (1, hidden), "const", 0.0)], (1, hidden), dt
            changes.append(TensorChange(sg, None, (1, hidden), "shared expert gate: zero (sigmoid 0.5)"))
    if unplaced:
        names = sorted({k.rsplit(".", 2)[-2] + "." + k.rsplit(".", 1)[-1] for k in unplaced})
        raise StepError(f"the dense model's tensors {', '.join(names)} (e.g. '{unplaced[0]}') have no place in a "
                        f"{new_mt} model (no attention or MLP biases there)",
                        hint="Only checkpoints without these biases can be upcycled to this family.")
    for key, spec in new_specs.items():  # every tensor of the MoE layout, with the shapes it implies
        if key in recipes:
            assert spec.shape is None or tuple(spec.shape) == tuple(shapes[key]), (key, spec.shape, shapes[key])
        elif not spec.optional:
            raise StepError(f"internal: the {new_mt} layout needs '{key}', which the upcycle does not create")
    before = a.num_parameters(set(plan.recipes))
    plan.recipes = {key: recipes[key] for key in new_specs if key in recipes}
    plan.shapes, plan.dtypes = shapes, dtypes

    out = {n: v for n, v in cfg.items() if n not in (up.get("drop_config") or [])}
    out.update(up.get("set_config") or {})
    out["model_type"] = new_mt
    if isinstance(cfg.get("architectures"), list):
        out["architectures"] = [_class_name(n, cls) for n in cfg["architectures"]]
    if renorm_flag != "always":
        out[renorm_flag] = step.norm_topk_prob
    plan.config_out = out
    exact = not inexact
    shared_text = (f"; shared expert {'holds half of the MLP (routed experts x 0.5)' if halve else 'zeroed'}, "
                   "its gate zero" if with_shared else "")
    summary = (f"{mt} -> {new_mt}: {E} experts per layer, each a copy of the dense MLP, top-{k} "
               f"({'renormalised' if renorm else 'NOT renormalised'}), router {step.router_init}"
               + (f" (std {step.router_std:g})" if step.router_init == "small" else "") + shared_text
               + (f", zero-sum noise {step.noise:g} on the down projections" if step.noise else "")
               + ("" if exact else " (APPROXIMATE: " + "; ".join(inexact) + ")"))
    plan.steps.append(PlannedStep(index, entry, summary, exact, changes, before, new_arch.num_parameters(set(plan.recipes))))
    plan.arch_after = new_arch
