"""Compile cost of path_sgd vs sgd (process CPU time) on ResNets: run with PYTHONPATH of a checkout."""
import sys, time, json, jax, jax.numpy as jnp, optax
import pathsgd_jax
from pathsgd_jax.experiments import resnets
out = {}
for depth in [int(d) for d in sys.argv[1].split(",")]:
  model, variables = resnets.init(depth, 32, jax.random.key(0))
  params, stats = variables["params"], variables["batch_stats"]
  apply = lambda p, x, stats=stats, model=model: model.apply({"params": p, "batch_stats": stats}, x)
  x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3)); y = jnp.zeros((2,), jnp.int32)
  def step_for(tx):
    def step(params, opt_state, x, y):
      loss = lambda p: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y))
      g = jax.grad(loss)(params)
      u, opt_state = tx.update(g, opt_state, params)
      return optax.apply_updates(params, u), opt_state
    return jax.jit(step)
  for name, tx in [("sgd", optax.sgd(0.01, momentum=0.9)),
                   ("path_sgd", pathsgd_jax.path_sgd(0.01, apply, x, momentum=0.9))]:
    st = tx.init(params)
    c0 = time.process_time(); w0 = time.perf_counter()
    low = step_for(tx).lower(params, st, x, y)
    c1 = time.process_time()
    comp = low.compile()
    c2 = time.process_time(); w2 = time.perf_counter()
    ma = comp.memory_analysis()
    r = dict(trace_cpu_s=c1 - c0, compile_cpu_s=c2 - c1, total_cpu_s=c2 - c0, wall_s=w2 - w0,
             stablehlo_lines=low.as_text().count("\n"), temp_mib=ma.temp_size_in_bytes / 2**20,
             peak_mib=(ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes + ma.temp_size_in_bytes) / 2**20)
    out[f"resnet{depth}/{name}"] = r
    print(depth, name, {k: round(v, 2) for k, v in r.items()}, flush=True)
  c0 = time.process_time()
  pathsgd_jax.path_structure(apply, params, x)
  c1 = time.process_time()
  pathsgd_jax.path_structure(apply, params, x)
  c2 = time.process_time()
  out[f"resnet{depth}/path_structure"] = dict(first_cpu_s=c1 - c0, second_cpu_s=c2 - c1)
  print(depth, "path_structure", round(c1 - c0, 2), round(c2 - c1, 2), flush=True)
json.dump(out, open(sys.argv[2], "w"), indent=1)
