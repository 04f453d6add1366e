"""Each step is compiled once: a run and its resume never retrace the train or eval step.

A step that retraces costs a compilation each time (minutes on a pod), and nothing
fails: the run is only slower. `chex.assert_max_traces` turns a retrace into an
error. The train step (`train.make_train_step`) and the eval step
(`evaluators.make_eval_step`) are wrapped as `train_and_evaluate` builds them;
a run of many steps with evaluations and checkpoints, then its resume in the same
process (a new program, so the counters start again), must trace each once: every
batch of a step has one shape.
"""

import chex
import jax
import jax.numpy as jnp
import pytest

from test_train import tiny_config  # pylint: disable=g-bad-import-order
from vit_jax import evaluators
from vit_jax import train


def _traced_once(monkeypatch, module, name):
  """Wraps what `module.name` builds in `chex.assert_max_traces(n=1)`."""
  build = getattr(module, name)

  def build_guarded(*args, **kwargs):
    return chex.assert_max_traces(build(*args, **kwargs), n=1)

  monkeypatch.setattr(module, name, build_guarded)


@pytest.fixture
def guarded_steps(monkeypatch):
  chex.clear_trace_counter()
  _traced_once(monkeypatch, train, 'make_train_step')
  _traced_once(monkeypatch, evaluators, 'make_eval_step')
  yield
  chex.clear_trace_counter()


def test_run_and_resume_trace_each_step_once(tmp_path, guarded_steps):
  del guarded_steps
  workdir = str(tmp_path)
  every = dict(eval_every=3, checkpoint_every=3, log_every=3)
  first = train.train_and_evaluate(tiny_config(total_steps=9, **every), workdir)
  assert first['step'] == 9 and 'eval_accuracy' in first

  chex.clear_trace_counter()  # the resume builds (and compiles) its own program
  resumed = train.train_and_evaluate(
      tiny_config(total_steps=15, resume_changes='continue', **every), workdir)
  assert resumed['step'] == 15 and 'eval_accuracy' in resumed


def test_a_retrace_fails(guarded_steps):
  """The guard itself: the same wrapped step called with a second shape is an error."""
  del guarded_steps
  step = jax.jit(chex.assert_max_traces(lambda x: jnp.sum(x * 2), n=1))
  step(jnp.ones(4))
  step(jnp.ones(4))  # cached: no trace
  with pytest.raises(AssertionError, match='traced > 1 times'):
    step(jnp.ones(5))
