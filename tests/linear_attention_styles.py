"""Linear attention written in its quadratic form, in the styles of public code (hand-written
here): each function takes (q, k, v) of shape (B, H, L, D) and returns (B, H, L, D)."""
import torch
import torch.nn.functional as F

EPS = 1e-6


def _causal_hidden(length, device):
    return torch.triu(torch.ones(length, length, dtype=torch.bool, device=device), diagonal=1)


def elu_causal_masked_fill(q, k, v):
    """Katharopoulos et al.: phi = elu + 1, a causal mask filled with 0, the normaliser after."""
    q, k = F.elu(q) + 1, F.elu(k) + 1
    scores = q @ k.transpose(-2, -1)
    scores = scores.masked_fill(_causal_hidden(q.shape[-2], q.device), 0.0)
    return (scores @ v) / (scores.sum(dim=-1, keepdim=True) + EPS)


def elu_causal_tril_multiply(q, k, v):
    """The mask as a 0/1 lower-triangular matrix multiplied in; rows normalised before the values."""
    q, k = torch.nn.functional.elu(q) + 1.0, torch.nn.functional.elu(k) + 1.0
    length = q.shape[-2]
    attn = torch.matmul(q, k.transpose(2, 3)) * torch.tril(torch.ones(length, length, device=q.device))
    attn = attn / attn.sum(-1, keepdim=True).clamp(min=EPS)
    return torch.matmul(attn, v)


def elu_einsum_normalised(q, k, v):
    """Non-causal, einsum throughout, the normaliser without keepdim."""
    q, k = F.elu(q) + 1, F.elu(k) + 1
    a = torch.einsum("bhld,bhsd->bhls", q, k)
    z = 1.0 / (a.sum(-1) + EPS)
    return torch.einsum("bhls,bhsd->bhld", a, v) * z[..., None]


def efficient_attention(q, k, v):
    """Shen et al.: softmax of q over the features, of k over the sequence; no normaliser."""
    q = q.softmax(dim=-1)
    k = k.softmax(dim=-2)
    return (q @ k.transpose(-1, -2)) @ v


def efficient_attention_heads_last(q, k, v):
    """Efficient attention on heads split from (B, L, H, D) projections (strided (B, H, L, D)
    views), F.softmax with dim= counted from the front and a dtype= equal to the input's."""
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    q = F.softmax(q, dim=3, dtype=q.dtype)
    k = torch.softmax(k, 2)
    return torch.matmul(torch.matmul(q, k.transpose(2, 3)), v)


def efficient_attention_einsum(q, k, v):
    """Efficient attention with einsum, k's softmax written on its transpose (dim=-1 of (B, H, D, L))."""
    q = q.softmax(-1)
    kt = k.transpose(-2, -1).softmax(dim=-1)
    return torch.einsum("bhls,bhse->bhle", torch.einsum("bhld,bhds->bhls", q, kt), v)


def softmax_features_causal(q, k, v):
    """Both softmaxes over the features (row-local, so causal is fine), causal tril, normalised."""
    q, k = q.softmax(dim=-1), k.softmax(dim=-1)
    s = torch.tril(q @ k.transpose(-2, -1))
    return (s @ v) / (s.sum(-1, keepdim=True) + EPS)


def rebased_causal(q, k, v, gamma=0.5, beta=0.1):
    """ReBased-style features (gamma * x + beta) ** 2, causal with tril, normalised."""
    q, k = (gamma * q + beta) ** 2, (gamma * k + beta) ** 2
    s = torch.tril(q @ k.transpose(-2, -1))
    return (s @ v) / (s.sum(-1, keepdim=True) + EPS)


def relu_causal_normalised(q, k, v):
    """relu features (as in cosFormer's before its reweighting), causal by masked_fill, normalised."""
    q, k = F.relu(q), torch.relu(k)
    s = (q @ k.transpose(-2, -1)).masked_fill(_causal_hidden(q.shape[-2], q.device), 0.0)
    return (s @ v) / (s.sum(-1, keepdim=True) + EPS)


def exp_and_sigmoid_features(q, k, v):
    """Positive features of two kinds, exp on q and sigmoid on k, non-causal, normalised."""
    q, k = q.exp(), k.sigmoid()
    s = q @ k.transpose(-2, -1)
    return (s @ v) / (s.sum(-1, keepdim=True) + EPS)


def identity_features_no_normaliser(q, k, v):
    """phi of either sign, no normaliser: the reassociation is still safe (no quotient)."""
    return (q @ k.transpose(-2, -1)) @ v * q.shape[-1] ** -0.5


STYLES = [elu_causal_masked_fill, elu_causal_tril_multiply, elu_einsum_normalised, efficient_attention,
          efficient_attention_heads_last, efficient_attention_einsum, softmax_features_causal,
          rebased_causal, relu_causal_normalised, exp_and_sigmoid_features, identity_features_no_normaliser]
CAUSAL = {elu_causal_masked_fill, elu_causal_tril_multiply, rebased_causal, relu_causal_normalised, softmax_features_causal}
# the elementwise feature maps the operator applies itself (spec phi_a, phi_b): phi(q), phi(k) never written
APPLIED_IN_THE_OPERATOR = {elu_causal_masked_fill: ("elu1", "elu1"), elu_causal_tril_multiply: ("elu1", "elu1"),
                           elu_einsum_normalised: ("elu1", "elu1"), rebased_causal: ("square", "square"),
                           relu_causal_normalised: ("relu", "relu"), exp_and_sigmoid_features: ("exp", "sigmoid"),
                           efficient_attention: ("softmax_features", "softmax_keys"),
                           efficient_attention_heads_last: ("softmax_features", "softmax_keys"),
                           efficient_attention_einsum: ("softmax_features", "softmax_keys"),
                           softmax_features_causal: ("softmax_features", "softmax_features"),
                           identity_features_no_normaliser: ("", "")}


# ---- feature maps that stay in the graph (the site is still fused) ---------------------------------

def elu_plus_two(q, k, v):
    """elu(x) + 2: not the operator's elu1 (the features stay the graph's)."""
    q, k = F.elu(q) + 2, F.elu(k) + 2
    s = q @ k.transpose(-2, -1)
    return (s @ v) / (s.sum(-1, keepdim=True) + EPS)


def features_cast_before_the_product(q, k, v):
    """phi in bfloat16, then widened: phi's rounding is bfloat16's, not the product's dtype."""
    q, k = (F.elu(q.bfloat16()) + 1).to(q.dtype), (F.elu(k.bfloat16()) + 1).to(k.dtype)
    s = q @ k.transpose(-2, -1)
    return (s @ v) / (s.sum(-1, keepdim=True) + EPS)


def softmax_over_the_wrong_axis(q, k, v):
    """q's softmax over the sequence, k's over the features: q's stays in the graph (the operator
    normalises a query's features only), k's (row-local) moves in."""
    q, k = q.softmax(dim=-2), k.softmax(dim=-1)
    return (q @ k.transpose(-2, -1)) @ v


def causal_with_keys_softmax_over_the_sequence(q, k, v):
    """k's softmax over the whole sequence under a causal mask: each key's features depend on later
    keys, so it stays in the graph (q's, over its features, moves in)."""
    q, k = q.softmax(-1), k.softmax(-2)
    s = (q @ k.transpose(-2, -1)).masked_fill(_causal_hidden(q.shape[-2], q.device), 0.0)
    return s @ v


def softmax_in_float32_before_the_product(q, k, v):
    """The softmaxes computed in float32 and rounded back: their dtype is not the product's."""
    q = F.softmax(q, dim=-1, dtype=torch.float32).to(q.dtype)
    k = F.softmax(k.float(), dim=-2).to(k.dtype)
    return (q @ k.transpose(-2, -1)) @ v


def softmax_with_a_tensor_temperature(q, k, v):
    """A temperature read from the data (not a constant): the division stays in the graph and the
    operator's softmax applies to its result, the exact features either way."""
    tau = q.detach().abs().amax(dim=-1, keepdim=True) + 1
    q, k = (q / tau).softmax(-1), (k / tau).softmax(-2)
    return (q @ k.transpose(-2, -1)) @ v


FEATURES_KEPT_IN_THE_GRAPH = [elu_plus_two, features_cast_before_the_product]
# softmax feature maps near the operator's: (phi_a, phi_b) taken in, a note's words when one stays out
SOFTMAX_NEAR_MISSES = {softmax_over_the_wrong_axis: (("", "softmax_features"), "over an axis the operator does not"),
                       causal_with_keys_softmax_over_the_sequence: (("softmax_features", ""), "at a causal site"),
                       softmax_in_float32_before_the_product: (("", ""), None),
                       softmax_with_a_tensor_temperature: (("softmax_features", "softmax_keys"), None)}


# ---- near-misses: left as written -------------------------------------------------------------

def softmax_in_between(q, k, v):
    """Ordinary attention (fuse-attention's), not a linear one."""
    return ((F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-2, -1)).softmax(-1) @ v


def sliding_window_mask(q, k, v):
    q, k = F.elu(q) + 1, F.elu(k) + 1
    length = q.shape[-2]
    i = torch.arange(length)
    hidden = (i[None, :] > i[:, None]) | (i[None, :] < i[:, None] - 2)
    s = (q @ k.transpose(-2, -1)).masked_fill(hidden, 0.0)
    return (s @ v) / (s.sum(-1, keepdim=True) + EPS)


def minus_inf_fill(q, k, v):
    q, k = F.elu(q) + 1, F.elu(k) + 1
    s = (q @ k.transpose(-2, -1)).masked_fill(_causal_hidden(q.shape[-2], q.device), float("-inf"))
    return s.exp() @ v


def scores_returned(q, k, v):
    q, k = F.elu(q) + 1, F.elu(k) + 1
    s = q @ k.transpose(-2, -1)
    return (s @ v) / s.sum(-1, keepdim=True), s


def signed_features_normalised(q, k, v):
    s = q @ k.transpose(-2, -1)
    return (s @ v) / s.sum(-1, keepdim=True)


def normaliser_before_mask(q, k, v):
    q, k = F.elu(q) + 1, F.elu(k) + 1
    s = q @ k.transpose(-2, -1)
    den = s.sum(-1, keepdim=True)
    return (s.tril() @ v) / den


NEAR_MISSES = {
    softmax_in_between: None,  # not a candidate at all
    sliding_window_mask: "not the causal mask",
    minus_inf_fill: None,  # exp after the fill: the product goes elsewhere
    scores_returned: "also used by",
    signed_features_normalised: "not provably non-negative",
    normaliser_before_mask: "before the causal mask",
}


def promoting_mask(q, k, v):
    """A float32 0/1 mask on bfloat16 scores promotes them (and the values' product) to float32."""
    q, k = F.elu(q) + 1, F.elu(k) + 1
    s = (q @ k.transpose(-2, -1)) * torch.tril(torch.ones(q.shape[-2], q.shape[-2]))
    return s @ v.float()


# ---- efficient attention already in the linear order: no (L, L) product; the softmaxes move in --------

def efficient_attention_linear_order(q, k, v):
    """q_s @ (k_s^T @ v) on (B, H, L, D) heads."""
    q, k = q.softmax(dim=-1), k.softmax(dim=-2)
    return q @ (k.transpose(-2, -1) @ v)


def efficient_attention_paper_code(q, k, v):
    """As Shen et al.'s code writes it, channels first: keys and queries (B*H, D, L), k's softmax
    over the positions (dim=2), q's over the channels (dim=1); context = k @ v^T, out = context^T @ q."""
    b, h, length, d = q.shape
    queries, keys, values = (t.transpose(-2, -1).reshape(b * h, d, length) for t in (q, k, v))
    key = F.softmax(keys, dim=2)
    query = F.softmax(queries, dim=1)
    context = key @ values.transpose(1, 2)
    attended = context.transpose(1, 2) @ query  # (B*H, D, L)
    return attended.reshape(b, h, d, length).transpose(-2, -1)


LINEAR_ORDER = [efficient_attention_linear_order, efficient_attention_paper_code]


def two_products_without_feature_maps(q, k, v):
    """q @ (k^T @ v) with no feature map: two products, left as written (not a linear attention here)."""
    return q @ (k.transpose(-2, -1) @ v)


def context_used_twice(q, k, v):
    q, k = q.softmax(dim=-1), k.softmax(dim=-2)
    context = k.transpose(-2, -1) @ v
    return q @ context, context
