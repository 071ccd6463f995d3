"""The op-time breakdown of `benchmarks/profile_breakdown.py` on a hand-written HLO text and trace."""

from __future__ import annotations

import gzip
import json

from benchmarks import profile_breakdown as pb

HLO = """
  %ynn_fusion.1 = f32[8,8]{1,0} fusion(%p), metadata={op_name="jvp(LingForCausalLM)/moe_layers/attention/dot_general"}
  %copy_bitcast_fusion.2 = f32[8]{0} fusion(%p), metadata={op_name="jit(train_step)/transpose(jvp(jit(logsumexp)))/exp"}
  %dot.3 = f32[8]{0} dot(%p), metadata={op_name="jit(train_step)/moe_layers/mlp/shared_experts/dot_general"}
  %add.4 = f32[8]{0} add(%p, %q), metadata={op_name="jit(train_step)/add"}
"""


def test_categories_follow_the_op_names_and_copies_count_apart(tmp_path):
    events = [{"ph": "X", "name": "ynn_fusion.1", "dur": 50}, {"ph": "X", "name": "copy_bitcast_fusion.2", "dur": 30},
              {"ph": "X", "name": "dot.3", "dur": 15}, {"ph": "X", "name": "add.4", "dur": 5},
              {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 1000}, {"ph": "i", "name": "dot.3"}]
    (tmp_path / "plugins" / "profile" / "run").mkdir(parents=True)
    with gzip.open(tmp_path / "plugins" / "profile" / "run" / "host.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    rows = pb.breakdown(HLO, str(tmp_path))
    assert rows == [("attention", 0.5, 0.0), ("vocab projection and loss", 0.3, 0.3), ("shared experts", 0.15, 0.0),
                    (pb.OTHER, 0.05, 0.0)]
    assert pb.category("jit(train_step)/dense_layers/dense_layers/mlp/dot_general") == "dense-first MLP"
    assert pb.category("x/moe_layers/mlp/while/body/dot_general") == "routed experts (grouped matmuls)"
