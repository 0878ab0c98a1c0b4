"""The optimizer of the fast recipe: Muon for the hidden layers' weight matrices, AdamW for the rest.

Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks"; Liu et al. 2025,
"Muon is Scalable for LLM Training", arXiv:2502.16982. The plain DDPM recipe trains with AdamW
alone (make_optimizer). training.py uses only make_optimizer.
"""

import math

import torch


def newton_schulz(G, steps=5):
    """About the orthogonal factor U V^T of each matrix G = U S V^T of a batch (B, m, n),
    in a few small matrix products instead of an SVD (the orthogonalization of Muon: Jordan
    et al. 2024, "Muon: An optimizer for hidden layers in neural networks"). A tall batch
    (m > n) is worked on as its transpose, so that X X^T is the smaller square, min(m, n)^2.

    (X X^T) X has the singular vectors of X and its singular values cubed, so the quintic
    X <- a X + b (X X^T) X + c (X X^T)^2 X maps each singular value s to a s + b s^3 + c s^5
    and keeps the vectors. Started from X = G / ||G||_F (every s <= 1), five steps with these
    coefficients take every s >= 0.01 ||G||_F into [0.68, 1.14] (test_newton_schulz_...):
    not exactly 1, and Muon does not need it to be.
    """
    tall = G.shape[-2] > G.shape[-1]
    X = G.mT.contiguous() if tall else G  # (B, m, n), m <= n
    a, b, c = 3.4445, -4.7750, 2.0315
    X = X / (X.norm(dim=(1, 2), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT  # (B, m, m)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A A, in one call
        X = torch.baddbmm(X, B, X, beta=a)  # a X + B X: (a + b A + c A^2) X
    return X.mT if tall else X


class Muon(torch.optim.Optimizer):
    """Muon for param groups marked matrix=True, AdamW (as torch.optim.AdamW) for the others.

    Muon (Jordan et al. 2024) treats a weight as the matrix it is; a conv filter bank
    (out, in, k, k) as out x (in k k). With the gradient G and momentum mu = 0.95:
        M <- mu M + G                             momentum
        O <- newton_schulz(G + mu M)              Nesterov; every singular value about 1
        W <- W (1 - lr wd) - lr 0.2 sqrt(max(m, n)) O
    Why: a gradient matrix is dominated by a few directions (a few large singular values), and
    Adam's elementwise step only partly evens that out, so the many weaker directions learn
    slowly (timestep_analysis.py draws both). The orthogonalized step moves every direction
    alike. O's RMS is 1 / sqrt(max(m, n)), so 0.2 sqrt(max(m, n)) O has an RMS of 0.2, about
    that of an AdamW step, and one --lr serves both kinds of parameter (Liu et al. 2025, "Muon
    is Scalable for LLM Training", arXiv:2502.16982, Sec. 2.2). Layers that read the pixels or
    write the output, biases, norms and embeddings stay with AdamW (muon_param_groups).
    """

    def __init__(self, param_groups, lr, weight_decay=0.0, momentum=0.95, betas=(0.9, 0.999), eps=1e-8):
        super().__init__(param_groups, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                            betas=betas, eps=eps, matrix=False))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self.muon_step if group["matrix"] else self.adamw_step)(group, params)

    def muon_step(self, group, params):
        lr, mu = group["lr"], group["momentum"]
        by_shape = {}  # (m, n) -> [(param, update)]: one batched newton_schulz each
        for p in params:
            M = self.state[p].setdefault("momentum", torch.zeros_like(p))
            M.mul_(mu).add_(p.grad)  # M <- mu M + G
            U = p.grad.add(M, alpha=mu).reshape(len(p), -1)  # Nesterov; (out, in k k)
            by_shape.setdefault(tuple(U.shape), []).append((p, U))
        for (m, n), items in by_shape.items():
            O = newton_schulz(torch.stack([U.float() for _, U in items]))  # (B, m, n)
            scale = 0.2 * max(m, n) ** 0.5  # O's RMS is 1 / sqrt(max(m, n)): the step's is 0.2 lr
            for (p, _), o in zip(items, O):
                p.mul_(1 - lr * group["weight_decay"])  # decoupled weight decay
                p.add_(o.reshape(p.shape).to(p.dtype), alpha=-lr * scale)  # W <- W - lr scale O

    def adamw_step(self, group, params):
        """torch.optim.AdamW's update, for many small tensors at once (_foreach ops)."""
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        states = [self.state[p] for p in params]
        for p, st in zip(params, states):
            if not st:
                st.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            st["step"] += 1
        n = states[0]["step"]
        grads = [p.grad for p in params]
        m, v = [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states]
        torch._foreach_lerp_(m, grads, 1 - beta1)  # m <- beta1 m + (1 - beta1) g
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, 1 - beta2)  # v <- beta2 v + (1 - beta2) g^2
        denom = torch._foreach_sqrt(v)  # sqrt(v / (1 - beta2^n)) + eps: bias-corrected
        torch._foreach_div_(denom, math.sqrt(1 - beta2 ** n))
        torch._foreach_add_(denom, eps)
        torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        torch._foreach_addcdiv_(params, m, denom, -lr / (1 - beta1 ** n))


def muon_param_groups(model):
    """Muon's matrices: the weights of every Conv2d and Linear layer except the first conv
    (it reads the pixels) and the last (it writes the output). Everything else (biases, norm
    scales, embedding tables): AdamW."""
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    matrices = [m.weight for m in layers if m is not convs[0] and m is not convs[-1]]
    chosen = {id(w) for w in matrices}
    rest = [p for p in model.parameters() if id(p) not in chosen]
    return [dict(params=matrices, matrix=True), dict(params=rest, matrix=False)]


def make_optimizer(model, name, lr, weight_decay, device):
    """--optimizer: "muon" (Muon for the weight matrices, AdamW for the rest) or "adamw", the
    fused (single-kernel) AdamW on CUDA and the foreach one elsewhere."""
    if name == "muon":
        return Muon(muon_param_groups(model), lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay,
                             fused=device.type == "cuda")
