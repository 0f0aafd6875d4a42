"""Parallel loops over row ranges, launched on Numba's threads without ``prange``.

``parallel_rows(body, n, args)`` (callable from jitted code only) runs ``body(lo, hi, *args)`` over
contiguous ranges [lo, hi) that cover [0, n), on Numba's threading layer, exactly as a ``prange``
loop would run its iterations: the same schedule (Numba's ``do_scheduling_signed`` over
``get_num_threads()`` threads and the parallel chunk size), the same launch (``numba_parallel_for``,
the GIL released around it), so results and speed are a prange's.

Why not prange: Numba compiles a prange loop's body as a separate function, then a wrapper around
that, then the function holding the loop, and each of the three re-optimizes every function the
body calls (LLVM links callees into each module and optimizes it whole).  Our loop bodies call the
big int8 tiles, and the fused decode step links several parallel kernels: a cold load and
generation of SmolLM2 compiled for 41.8 s with prange and 31.4 s with this (Zen 1, same hour).
Here the body is an ordinary jitted function, compiled once, linked into the caller once (as any
callee), and called from a small gufunc-shaped entry point emitted into the caller's own module.

``body`` must be a module-level ``@njit`` function whose first two parameters are the range; the
remaining arguments travel as one tuple (its fields are read by every thread: arrays are shared,
and each range must write only its own rows).  The body must not raise (the kernels use
``error_model="numpy"`` and check their inputs before the launch); a body's error status is
ignored.
"""

from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils, types
from numba.core.errors import TypingError
from numba.extending import intrinsic

_VOID = ir.VoidType()
_I8P = ir.IntType(8).as_pointer()


def _declare(module, name, restype, argtypes):
    return cgutils.get_or_insert_function(module, ir.FunctionType(restype, argtypes), name)


@intrinsic
def parallel_rows(typingctx, body, n, args):
    if not isinstance(body, types.Dispatcher) or not isinstance(n, types.Integer) \
            or not isinstance(args, types.BaseTuple):
        return None
    body_sig = typingctx.resolve_function_type(body, (types.intp, types.intp, *args.types), {})
    if body_sig is None:
        raise TypingError(f"parallel_rows: {body} cannot take (lo, hi, *{args})")

    def codegen(context, builder, sig, llargs):
        from numba.core.typed_passes import _reload_parfors
        from numba.np.ufunc.parallel import _launch_threads

        _launch_threads()  # registers numba_parallel_for and the scheduler with LLVM
        library = context.active_code_library
        library._reload_init.add(_reload_parfors)  # and again when loaded from the cache
        cres = body.dispatcher.get_compile_result(body_sig)
        context.add_linking_libs([cres.library])

        module = builder.module
        intp = context.get_value_type(types.intp)
        intp_p = intp.as_pointer()
        zero, one, two = (ir.Constant(intp, v) for v in (0, 1, 2))
        args_ty = context.get_value_type(args)

        # the entry point each thread calls: for each (start, end) pair of its schedule (inclusive
        # ends), body(start, end + 1, *args)
        entry_ty = ir.FunctionType(_VOID, [_I8P.as_pointer(), intp_p, intp_p, _I8P])
        entry = ir.Function(module, entry_ty, name=module.get_unique_name("edgellama.parallel_rows"))
        entry.linkage = "internal"
        eb = ir.IRBuilder(entry.append_basic_block())
        e_args, e_dims, _, _ = entry.args
        sched = eb.bitcast(eb.load(e_args), intp_p)
        packed = eb.load(eb.bitcast(eb.load(eb.gep(e_args, [one])), args_ty.as_pointer()))
        values = [eb.extract_value(packed, i) for i in range(len(args))]
        callee = context.declare_function(module, cres.fndesc)
        with cgutils.for_range(eb, eb.load(e_dims)) as loop:
            pair = eb.mul(loop.index, two)
            lo = eb.load(eb.gep(sched, [pair]))
            hi = eb.add(eb.load(eb.gep(sched, [eb.add(pair, one)])), one)
            context.call_conv.call_function(eb, callee, cres.fndesc.restype, cres.fndesc.argtypes,
                                            [lo, hi, *values])
        eb.ret_void()

        count = context.cast(builder, llargs[1], sig.args[1], types.intp)
        with builder.if_then(builder.icmp_signed(">", count, zero)):
            get_num_threads = _declare(module, "get_num_threads", intp, [])
            get_chunksize = _declare(module, "get_parallel_chunksize", intp, [])
            set_chunksize = _declare(module, "set_parallel_chunksize", _VOID, [intp])
            get_sched_size = _declare(module, "get_sched_size", intp, [intp, intp, intp_p, intp_p])
            allocate_sched = _declare(module, "allocate_sched", intp_p, [intp])
            deallocate_sched = _declare(module, "deallocate_sched", _VOID, [intp_p])
            do_scheduling = _declare(module, "do_scheduling_signed", intp_p,
                                     [intp, intp_p, intp_p, intp, intp_p, intp])
            parallel_for = _declare(module, "numba_parallel_for", _VOID, [_I8P] * 5 + [intp] * 3)

            threads = builder.call(get_num_threads, [])
            chunksize = builder.call(get_chunksize, [])
            starts = cgutils.alloca_once(builder, intp)
            stops = cgutils.alloca_once(builder, intp)
            builder.store(zero, starts)
            builder.store(builder.sub(count, one), stops)  # inclusive
            divisions = builder.call(get_sched_size, [threads, one, starts, stops])
            builder.call(set_chunksize, [zero])  # nested launches get the default chunk size
            schedule = builder.call(allocate_sched, [builder.mul(divisions, two)])
            builder.call(do_scheduling, [one, starts, stops, divisions, schedule, zero])

            stored = cgutils.alloca_once(builder, args_ty)
            builder.store(llargs[2], stored)
            pargs = cgutils.alloca_once(builder, _I8P, size=2)
            builder.store(builder.bitcast(schedule, _I8P), pargs)
            builder.store(builder.bitcast(stored, _I8P), builder.gep(pargs, [one]))
            dims = cgutils.alloca_once(builder, intp, size=2)
            builder.store(divisions, dims)
            builder.store(two, builder.gep(dims, [one]))
            steps = cgutils.alloca_once(builder, intp, size=2)
            builder.store(ir.Constant(intp, 2 * context.get_abi_sizeof(intp)), steps)
            builder.store(zero, builder.gep(steps, [one]))

            pyapi = context.get_python_api(builder)
            gil = pyapi.gil_ensure()  # as Numba's parallel launches: the GIL is free while threads run
            thread_state = pyapi.save_thread()
            builder.call(parallel_for, [builder.bitcast(entry, _I8P), builder.bitcast(pargs, _I8P),
                                        builder.bitcast(dims, _I8P), builder.bitcast(steps, _I8P),
                                        ir.Constant(_I8P, None), one, two, threads])
            pyapi.restore_thread(thread_state)
            pyapi.gil_release(gil)
            builder.call(set_chunksize, [chunksize])
            builder.call(deallocate_sched, [schedule])
        return context.get_dummy_value()

    return types.void(body, n, args), codegen


@intrinsic
def num_threads(typingctx):
    """Numba's current thread count (numba.get_num_threads(), whose jitted form holds a run-time
    address and so keeps a function out of the cache), as parallel_rows reads it."""
    def codegen(context, builder, sig, llargs):
        from numba.core.typed_passes import _reload_parfors
        from numba.np.ufunc.parallel import _launch_threads

        _launch_threads()  # registers get_num_threads with LLVM (as parallel_rows)
        context.active_code_library._reload_init.add(_reload_parfors)
        intp = context.get_value_type(types.intp)
        return builder.call(_declare(builder.module, "get_num_threads", intp, []), [])

    return types.intp(), codegen
