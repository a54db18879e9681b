"""Run by tests/test_fsdp.py under ``torch.distributed.run`` with 2 CPU processes (gloo): one FSDP2 AdamW step of a
tiny UNet on each process's own batch must equal one single-process step on the mean of the two losses; sharded
checkpoints must restore the weights and the optimizer exactly, and the final gather must give the full weights."""

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from diffusers import UNet2DConditionModel

from rewardtune.diffusion.backbones import UNetBackbone
from rewardtune.utils import fsdp


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=2)


def batch(rank: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(100 + rank)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.randint(0, 1000, (2,), generator=g),
            torch.randn(2, 5, 16, generator=g))


def loss_of(model, x, t, c) -> torch.Tensor:
    return model(x, t, c).sample.pow(2).mean()


def step(model, optimizer, loss) -> None:
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def sharded(model):
    model = fsdp.shard(model, UNetBackbone().shard_units(model))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in b)


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    reference = tiny_unet()
    model, optimizer = sharded(copy.deepcopy(reference))
    step(model, optimizer, loss_of(model, *batch(rank)))
    single_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    step(reference, single_opt, (loss_of(reference, *batch(0)) + loss_of(reference, *batch(1))) / 2)
    after_one = fsdp.full_state_dict(model)

    tmp = out / "ckpt.tmp"
    fsdp.save_sharded(tmp, model, optimizer)
    dist.barrier()
    if rank == 0:
        tmp.rename(out / "ckpt")
    dist.barrier()
    restored, restored_opt = sharded(tiny_unet())
    fsdp.load_sharded(out / "ckpt", restored, restored_opt)
    restored_state = fsdp.full_state_dict(restored)
    for m, o in ((model, optimizer), (restored, restored_opt)):  # a second step from the restored optimizer
        step(m, o, loss_of(m, *batch(rank)))
    second, second_restored = fsdp.full_state_dict(model), fsdp.full_state_dict(restored)
    local = next(iter(model.parameters()))
    if rank == 0:
        result = {
            "sharded": fsdp.is_sharded(model), "local_rows": local.to_local().shape[0], "full_rows": local.shape[0],
            "step_vs_single_process": max_diff(after_one, reference.state_dict()),
            "moved": max_diff(after_one, tiny_unet().state_dict()),
            "restored": max_diff(restored_state, after_one),
            "second_step_restored": max_diff(second_restored, second),
            "files": sorted(p.name for p in (out / "ckpt").iterdir()),
        }
        (out / "result.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
