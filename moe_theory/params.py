"""Parameter pytrees, field schemas, validation and conversion to and from plain dicts.

A fitted or true mixture of experts with k experts is described by two groups of arrays:

* ``gate``   -- the gating parameters, for example β₀ ∈ R^k and β₁ ∈ R^{k×d} of the softmax gate
  π_i(x) ∝ exp(β_{1i}ᵀx + β_{0i}), or (w, c, Γ) of the Gaussian gate π_i(x) ∝ w_i N(x | c_i, Γ_i);
* ``expert`` -- the expert parameters, for example (a, b, ν) of Gaussian-linear experts
  y | expert i ~ N(a_iᵀx + b_i, ν_i), with ν_i a *variance* (``docs/experts.md``).

:class:`MoEParams` holds both as ``dict[str, Array]``; it is a JAX pytree, so it passes through
``jit``, ``vmap`` and ``grad`` unchanged. Which keys exist and what shapes they have is declared by
the gate and the expert as a tuple of :class:`Field` records. The shape of a field is written with
the symbols ``"k"`` (number of experts), ``"d"`` (input dimension) and ``"C-1"`` (number of free
classes of a multinomial expert), so that one schema serves every family size.

The same schema drives three things:

1. :func:`params_from_dict` turns the nested lists a YAML config holds into arrays, with every
   shape and value checked and any error naming the field (``expert.nu``) and what was expected;
2. :func:`params_to_dict` writes them back to plain nested lists;
3. :func:`unconstrain` and :func:`constrain` map each field to the unconstrained coordinates every
   fitter moves in (``positive`` fields via log, ``positive_definite`` ones via the log-Cholesky
   factor) and back; experts use them too, for their derivatives in those coordinates.

Each field also declares its **role**, what the array *means* to the generic machinery (see
:data:`ROLES`): starts, Newton constraints, translations, losses and samplers look a field up by
its role (:func:`field_with_role`), never by its name, so a new gate or expert with fields of its
own names works with all of them. The mathematics is in ``docs/gates.md`` and ``docs/experts.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple

import jax.numpy as jnp
import numpy as np

from . import linalg

CONSTRAINTS = ("real", "positive", "positive_definite")

ROLES: dict[str, str] = {
    "offset": "additive per-expert gate offset (β₀); a softmax translation t₀ adds to it",
    "weight": "positive per-expert gate weight w, whose log is the gate's offset (the Gaussian gate)",
    "slope": "gate slope multiplying the input (β₁ of the linear score); a softmax translation t₁ adds to it",
    "location": "a point in input space per expert (Euclidean and Laplace β₁, Gaussian-gate centre c)",
    "covariance": "a d × d covariance matrix per expert (Gaussian-gate Γ)",
    "temperature": "the gate temperature τ shared by all experts",
    "coefficient": "other real per-expert coefficients of a score or an expert (a, b, η₀, η₁, γ)",
    "variance": "an expert's noise variance ν",
}
"""The roles a :class:`Field` may declare, with what each means to the generic code."""

_ROLE_CONSTRAINTS = {"weight": "positive", "variance": "positive", "temperature": "positive", "covariance": "positive_definite"}


class ParameterError(ValueError):
    """A parameter has the wrong shape, an invalid value, or is missing."""


@dataclass(frozen=True)
class Field:
    """One named array of a gate or an expert.

    Attributes:
        name: key in the parameter dict, e.g. ``"beta1"``.
        shape: shape template made of ints and the symbols ``"k"``, ``"d"`` and ``"C-1"``.
        constraint: ``"real"``, ``"positive"`` (every entry > 0) or ``"positive_definite"``
            (each trailing d×d matrix symmetric positive definite).
        description: what the field means, with its paper symbol; used in error messages.
        role: what the field means to the generic code, a key of :data:`ROLES`. Roles that imply
            a constraint (a variance is positive, a covariance positive definite) must carry it.
    """

    name: str
    shape: tuple[int | str, ...]
    constraint: str = "real"
    description: str = ""
    role: str = "coefficient"

    def __post_init__(self) -> None:
        if self.constraint not in CONSTRAINTS:
            raise ValueError(f"Field {self.name!r}: unknown constraint {self.constraint!r}; expected one of {CONSTRAINTS}")
        if self.role not in ROLES:
            raise ValueError(f"Field {self.name!r}: unknown role {self.role!r}; expected one of {sorted(ROLES)}")
        needed = _ROLE_CONSTRAINTS.get(self.role)
        if needed is not None and self.constraint != needed:
            raise ValueError(f"Field {self.name!r}: a {self.role} must have constraint {needed!r}, got {self.constraint!r}")

    def resolve_shape(self, num_experts: int, dim: int, num_classes: int | None) -> tuple[int, ...]:
        sizes = {"k": num_experts, "d": dim}
        if num_classes is not None:
            sizes["C-1"] = num_classes - 1
        return tuple(sizes[s] if isinstance(s, str) else s for s in self.shape)


def fields_with_role(fields: tuple[Field, ...], role: str) -> tuple[Field, ...]:
    """The fields of ``fields`` that declare ``role`` (in schema order)."""
    if role not in ROLES:
        raise ValueError(f"role: unknown role {role!r}; expected one of {sorted(ROLES)}")
    return tuple(field for field in fields if field.role == role)


def field_with_role(fields: tuple[Field, ...], role: str) -> Field | None:
    """The one field declaring ``role``, or None; more than one is a schema error."""
    found = fields_with_role(fields, role)
    if len(found) > 1:
        raise ValueError(f"role {role!r}: expected at most one field, got {[field.name for field in found]}")
    return found[0] if found else None


class MoEParams(NamedTuple):
    """Parameters of one mixture of experts: ``gate`` and ``expert`` dicts of arrays.

    Leading batch axes (replicates, random starts) may be added to every leaf by ``vmap``.
    """

    gate: dict[str, Any]
    expert: dict[str, Any]


def _describe_shape(template: tuple[int | str, ...], resolved: tuple[int, ...]) -> str:
    names = ", ".join(str(s) for s in template)
    return f"{resolved} ({names})" if template else "() (a scalar)"


def _check_value(path: str, field: Field, value: np.ndarray) -> None:
    if not np.all(np.isfinite(value)):
        bad = np.argwhere(~np.isfinite(value))
        where = tuple(int(i) for i in bad[0]) if value.ndim else ()
        raise ParameterError(f"{path}{list(where) if where else ''}: expected finite values, got {value[where]!r}")
    if field.constraint == "positive" and np.any(value <= 0):
        idx = tuple(int(i) for i in np.argwhere(value <= 0)[0]) if value.ndim else ()
        raise ParameterError(
            f"{path}{list(idx) if idx else ''} = {float(value[idx])!r}: expected > 0 ({field.description})"
        )
    if field.constraint == "positive_definite":
        if not np.allclose(value, np.swapaxes(value, -1, -2)):
            raise ParameterError(f"{path}: expected symmetric matrices ({field.description})")
        eigenvalues = np.linalg.eigvalsh(value)
        if np.any(eigenvalues <= 0):
            expert = int(np.argwhere(eigenvalues <= 0)[0][0])
            raise ParameterError(
                f"{path}[{expert}]: expected a positive definite matrix, smallest eigenvalue is "
                f"{float(eigenvalues[expert].min())!r} ({field.description})"
            )


def validate_group(
    group: str,
    fields: tuple[Field, ...],
    values: Mapping[str, Any],
    num_experts: int,
    dim: int,
    num_classes: int | None,
) -> dict[str, np.ndarray]:
    """Check names, shapes and values of one parameter group; return NumPy float64 arrays.

    A ``(k,)`` array is accepted for a ``(k, 1)`` field when d = 1 (and likewise a trailing
    axis of length 1 may be left out), so that one-dimensional configs can be written as flat lists.
    """
    if not isinstance(values, Mapping):
        raise ParameterError(f"{group}: expected a mapping of parameter names to arrays, got {type(values).__name__}")
    known = {f.name for f in fields}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ParameterError(f"{group}: unknown parameter(s) {unknown}; expected exactly {sorted(known)}")
    missing = sorted(known - set(values))
    if missing:
        raise ParameterError(f"{group}: missing parameter(s) {missing}; expected exactly {sorted(known)}")
    checked = {}
    for field in fields:
        path = f"{group}.{field.name}"
        try:
            value = np.asarray(values[field.name], dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise ParameterError(f"{path}: expected a numeric array, got {values[field.name]!r} ({error})") from None
        shape = field.resolve_shape(num_experts, dim, num_classes)
        if value.shape != shape and value.shape + (1,) == shape:
            value = value[..., None]
        if value.shape != shape:
            raise ParameterError(
                f"{path}: expected shape {_describe_shape(field.shape, shape)}, got {value.shape} "
                f"({field.description})"
            )
        _check_value(path, field, value)
        checked[field.name] = value
    return checked


def to_jax(group: Mapping[str, np.ndarray], dtype) -> dict[str, jnp.ndarray]:
    return {name: jnp.asarray(value, dtype=dtype) for name, value in group.items()}


def params_to_dict(params: MoEParams) -> dict[str, dict[str, Any]]:
    """Write parameters back to plain nested lists (the layout :func:`params_from_dict` reads)."""
    return {
        group: {name: np.asarray(value).tolist() for name, value in getattr(params, group).items()}
        for group in MoEParams._fields
    }


# ----------------------------------------------------------------------------------------------
# Unconstrained coordinates, in which every fitter moves.


def _log_cholesky(matrix: jnp.ndarray) -> jnp.ndarray:
    factor = linalg.cholesky(matrix)
    diagonal = jnp.diagonal(factor, axis1=-2, axis2=-1)
    return factor - jnp.vectorize(jnp.diag, signature="(d)->(d,d)")(diagonal - jnp.log(diagonal))


def _from_log_cholesky(unconstrained: jnp.ndarray) -> jnp.ndarray:
    lower = jnp.tril(unconstrained)
    diagonal = jnp.diagonal(lower, axis1=-2, axis2=-1)
    factor = lower + jnp.vectorize(jnp.diag, signature="(d)->(d,d)")(jnp.exp(diagonal) - diagonal)
    return factor @ jnp.swapaxes(factor, -1, -2)


def unconstrain(fields: tuple[Field, ...], group: Mapping[str, jnp.ndarray]) -> dict[str, jnp.ndarray]:
    """Map a parameter group to unconstrained coordinates."""
    out = {}
    for field in fields:
        value = group[field.name]
        if field.constraint == "positive":
            value = jnp.log(value)
        elif field.constraint == "positive_definite":
            value = _log_cholesky(value)
        out[field.name] = value
    return out


def constrain(fields: tuple[Field, ...], group: Mapping[str, jnp.ndarray]) -> dict[str, jnp.ndarray]:
    """Inverse of :func:`unconstrain`."""
    out = {}
    for field in fields:
        value = group[field.name]
        if field.constraint == "positive":
            value = jnp.exp(value)
        elif field.constraint == "positive_definite":
            value = _from_log_cholesky(value)
        out[field.name] = value
    return out
