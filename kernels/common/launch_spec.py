"""The argument specialisation a Triton launch gives a kernel, for ahead-of-time compiles.

A launch (``kernel[grid](...)``) does not compile the kernel for the plain argument types: Triton
specialises every argument it may (``triton.runtime.jit``, ``BaseBackend.get_*_specialization``):

* a pointer whose address is a multiple of 16 gets ``tt.divisibility = 16`` (whole torch tensors
  and the hosts' contiguous buffers always are: the caching allocator aligns to 512 bytes), unless
  the kernel lists it in ``do_not_specialize_on_alignment``;
* an integer equal to 1 becomes the constant 1, one divisible by 16 gets ``tt.divisibility = 16``,
  unless the kernel lists it in ``do_not_specialize`` (per-launch counters such as the MLP chunk
  step must be there: each distinct specialisation is another compile at run time);
* floats are never specialised.

These hints change the generated code (vectorised loads, address arithmetic, register use), so an
AOT check compiled without them can pass where the launched kernel spills. :func:`launch_specialization`
applies the same rules to a signature and the integer values of a real launch (the shipped model
shapes), so ``tools/kernel_report.py`` and ``miras_kernels.miras_mlp.aot`` compile what launches run.
"""

from __future__ import annotations


def _unspecialised(fn, attr: str) -> set:
    """Names and indices a ``@triton.jit`` kernel lists in ``attr`` (``do_not_specialize`` or
    ``do_not_specialize_on_alignment``); works for compiled and interpreted kernels alike."""
    listed = getattr(fn, attr, None)
    if listed is None:   # the interpreter's InterpretedFunction keeps the decorator's keywords
        listed = getattr(fn, "kwargs", {}).get(attr)
    return set(listed or ())


def _name(fn) -> str:
    return getattr(fn, "__name__", None) or getattr(getattr(fn, "fn", None), "__name__", "kernel")


def launch_specialization(fn, signature: dict[str, str], ints: dict[str, int]
                          ) -> tuple[dict[str, str], dict[str, int], dict[tuple[int], list]]:
    """Specialise ``signature`` (argument name -> Triton type, ``"constexpr"`` for constexprs) the
    way a launch does.

    Args:
        fn: the ``@triton.jit`` kernel (its ``arg_names`` and ``do_not_specialize`` lists).
        signature: every argument's type as ``ASTSource`` takes it (``"*bf16"``, ``"i32"``, ``"fp32"``,
            ``"constexpr"``).
        ints: the value a real launch passes for each specialisable integer argument.
    Returns:
        ``(signature, constexprs, attrs)``: the signature with integers equal to 1 turned into
        ``"constexpr"``, those constants (name -> 1) to merge into the constexprs, and ``attrs``
        (``{(arg index,): [["tt.divisibility", 16]]}``) for ``ASTSource(attrs=...)``.
    Raises:
        ValueError: an integer argument that the kernel specialises has no value in ``ints``.
    """
    dns = _unspecialised(fn, "do_not_specialize")
    dns_align = _unspecialised(fn, "do_not_specialize_on_alignment")
    sig = dict(signature)
    consts: dict[str, int] = {}
    attrs: dict[tuple[int], list] = {}
    for i, name in enumerate(fn.arg_names):
        ty = sig[name]
        if ty == "constexpr":
            continue
        if ty.startswith("*"):
            if name not in dns_align and i not in dns_align:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif ty[0] in "iu":
            if name in dns or i in dns:
                continue
            if name not in ints:
                raise ValueError(f"{_name(fn)}: integer argument {name!r} is specialised at launch but has no "
                                 "launch value: pass it in ints, or add it to the kernel's do_not_specialize "
                                 "if it changes from launch to launch")
            value = int(ints[name])
            if value == 1:
                sig[name] = "constexpr"
                consts[name] = 1
            elif value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs
