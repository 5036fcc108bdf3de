"""Word problems on permutation groups: a sequence of group elements and, at every position, the running product.

An element of S_n is a permutation p of (0, ..., n-1), stored as the tuple (p(0), ..., p(n-1)).
Composition: (a ∘ b)(i) = a(b(i)), i.e. b is applied first.
Running product: product_0 = x_0 and product_t = x_t ∘ product_{t-1}, so the newest element acts last
(product_t = x_t ∘ ... ∘ x_1 ∘ x_0). Token ids are the indices of the elements in lexicographic order;
id 0 is always the identity.
"""

from itertools import permutations

import torch


def compose(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """(a ∘ b)(i) = a(b(i)): apply b, then a."""
    return tuple(a[i] for i in b)


def is_even(p: tuple[int, ...]) -> bool:
    inversions = sum(p[i] > p[j] for i in range(len(p)) for j in range(i + 1, len(p)))
    return inversions % 2 == 0


class PermutationGroup:
    """S_n or A_n with a multiplication table over token ids: table[a, b] = id of (a ∘ b)."""

    def __init__(self, name: str):
        kind, n = name[0].upper(), int(name[1:])
        if kind not in "SA" or n < 2:
            raise ValueError(f"group must be S<n> or A<n> (e.g. S3, S5, A5), got {name!r}")
        self.name = f"{kind}{n}"
        self.elements = [p for p in permutations(range(n)) if kind == "S" or is_even(p)]
        index = {p: i for i, p in enumerate(self.elements)}
        self.table = torch.tensor([[index[compose(a, b)] for b in self.elements] for a in self.elements])

    @property
    def order(self) -> int:
        return len(self.elements)

    def sample(self, batch: int, length: int, generator: torch.Generator | None = None):
        """Uniform random words (batch, length) and their running products (batch, length), both int64 ids."""
        words = torch.randint(self.order, (batch, length), generator=generator)
        return words, self.running_product(words)

    def running_product(self, words: torch.Tensor) -> torch.Tensor:
        """product_t = x_t ∘ product_{t-1}, product_0 = x_0, for words (batch, length) of ids."""
        products = torch.empty_like(words)
        products[:, 0] = words[:, 0]
        for t in range(1, words.shape[1]):
            products[:, t] = self.table[words[:, t], products[:, t - 1]]
        return products
