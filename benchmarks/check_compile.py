"""GPU check: torch.compile of a Samba model runs through the Triton custom ops and matches eager."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import samba_lm  # noqa: E402

torch.manual_seed(0)
model = samba_lm.SambaLM(samba_lm.SambaConfig.from_preset("tiny")).cuda()
ids = torch.randint(0, 4096, (4, 512), device="cuda")


def loss_and_grads(m):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = m(ids[:, :-1]).logits.float().log_softmax(-1).gather(-1, ids[:, 1:, None]).mean().neg()
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])


eager_loss, eager_grad = loss_and_grads(model)
compiled = torch.compile(model, fullgraph=False)
comp_loss, comp_grad = loss_and_grads(compiled)
rel = ((comp_grad - eager_grad).norm() / eager_grad.norm()).item()
print(f"torch.compile: loss eager {eager_loss:.5f} compiled {comp_loss:.5f}, grad rel diff {rel:.2e}")
assert abs(eager_loss - comp_loss) < 1e-2 and rel < 5e-2
