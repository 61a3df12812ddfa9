"""Run by tests/test_distributed.py under torchrun (2 CPU processes, gloo): one backward of the fused loss on an
FSDP2-sharded student, with every parameter's gradient gathered and saved by rank 0.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_worker.py STUDENT TEACHER OUT.pt

(the suite runs it inside tests/ddp_worker.py's single launch, in the process group already there)

The loss reads lm_head.weight right after the root's forward, as the scripts do (FSDP2 keeps it gathered then).
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import losses  # noqa: E402
import models  # noqa: E402


def batch_and_teacher(teacher_path: str, rank: int, world: int):
    """The same 4 sequences as the single-process reference; this rank takes rows rank::world."""
    input_ids = torch.randint(3, 400, (4, 12), generator=torch.Generator().manual_seed(1))
    teacher = models.frozen_teacher(transformers.AutoModelForCausalLM.from_pretrained(teacher_path))
    mine = input_ids[rank::world]
    with torch.no_grad():
        teacher_hidden = models.teacher_hidden_states(teacher, mine, torch.ones_like(mine))
    return mine, teacher_hidden[:, :-1].reshape(-1, teacher_hidden.shape[-1]), models.output_head(teacher).weight


def tied_student(path: str):
    """The kit's student architecture with lm_head tied to the embeddings (as Qwen2.5-0.5B), same init on every rank."""
    config = transformers.AutoConfig.from_pretrained(path)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    student = transformers.AutoModelForCausalLM.from_config(config)
    assert student.lm_head.weight is student.model.embed_tokens.weight
    return student


def fused_loss(student, input_ids, teacher_hidden, teacher_weight, num_tokens):
    hidden = models.student_hidden_states(student, input_ids, torch.ones_like(input_ids))
    loss, _, _ = losses.fused_head_loss(
        hidden[:, :-1].reshape(-1, hidden.shape[-1]), models.output_head(student).weight,
        input_ids[:, 1:].reshape(-1), num_tokens, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
        alpha=0.3, beta=0.5, temperature=2.0, chunk_size=7)
    return loss


def main(student_path, teacher_path, out):
    own_group = not dist.is_initialized()  # tests/ddp_worker.py runs this inside its own process group
    if own_group:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    student = tied_student(student_path)
    for layer in student.model.layers:
        fully_shard(layer)
    fully_shard(student)
    input_ids, teacher_hidden, teacher_weight = batch_and_teacher(teacher_path, rank, world)
    loss = fused_loss(student, input_ids, teacher_hidden, teacher_weight, 4 * 11)
    (loss * world).backward()  # FSDP averages gradients over ranks; the loss is a share of a global sum
    grads = {name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
             for name, p in student.named_parameters()}
    if rank == 0:
        torch.save(grads, out)
    dist.barrier()
    if own_group:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
