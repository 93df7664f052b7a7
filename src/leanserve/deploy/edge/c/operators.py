"""Lowering each ONNX operator of a QDQ graph: QuantizeLinear/DequantizeLinear, the accumulating ops
(Conv, Gemm, MatMul, Add, average pooling) that wait for the QuantizeLinear fixing their output scale,
and the elementwise and shape ops that stay in the integer domain.

``_Operators`` holds one ``_<op>`` method per supported operator; ``lower._Lowering`` walks the graph,
calls them, and supplies the environment (``env``, ``layers``, ``producer``, ``uses``) and the helpers
``_value``, ``_new_buffer``, ``_emit`` and ``_fail``.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from leanserve.deploy.edge.c.program import Layer, QParams, quantize_multiplier, requant_scale
from leanserve.deploy.edge.c.values import _clamp_range, _Const, _Final, _FloatInput, _Pending, _QConst, _View


class _Operators:
    # --- quantization ---------------------------------------------------------------------------

    def _qparams(self, node, index_scale: int = 1, index_zp: int = 2) -> tuple[QParams, str]:
        scale = np.asarray(self._value(node, index_scale, _Const).array, dtype=np.float64)
        zp_value = self._value(node, index_zp, _Const) if len(node.input) > index_zp else None
        zp = np.asarray(zp_value.array) if zp_value is not None else np.zeros((), np.uint8)
        if scale.size != 1 or zp.size != 1:
            self._fail(node, "activations need one scale and zero point for the whole tensor")
        if zp.dtype == np.uint8:
            return QParams(float(scale.reshape(())), int(zp.reshape(())) - 128), "uint8"
        if zp.dtype == np.int8:
            return QParams(float(scale.reshape(())), int(zp.reshape(()))), "int8"
        self._fail(node, f"activations must be int8 or uint8, got {zp.dtype}")

    def _quantizelinear(self, node, attrs) -> None:
        qp, _ = self._qparams(node)
        value = self._value(node, 0)
        out = node.output[0]
        if isinstance(value, _FloatInput):
            if self.input_qparams is not None:
                self._fail(node, "the model's input is quantized twice")
            buffer = self._new_buffer(out, np.prod(value.shape))
            self.input_qparams, self.input_buffer = qp, buffer
            self._emit(Layer("quantize", node.name or out, (), buffer, {"n": int(np.prod(value.shape)),
                                                                         "scale": qp.scale, "zero_point": qp.zero_point}))
            self.env[out] = _View(buffer, qp, value.shape)
        elif isinstance(value, _View):
            self.env[out] = value if value.qp == qp else self._requantize(node, value, qp)
        elif isinstance(value, _Pending):
            self.env[out] = self._materialize(value, qp)
        else:
            self._fail(node, "quantizes a tensor the C target cannot compute in int8")

    def _dequantizelinear(self, node, attrs) -> None:
        value = self._value(node, 0)
        if isinstance(value, _Const):
            scale = np.asarray(self._value(node, 1, _Const).array, dtype=np.float64)
            zp = np.asarray(self._value(node, 2, _Const).array) if len(node.input) > 2 and node.input[2] else \
                np.zeros_like(scale, dtype=value.array.dtype)
            self.env[node.output[0]] = _QConst(value.array, scale, zp, int(attrs.get("axis", 1)))
        elif isinstance(value, _View):  # quantized values stay quantized: the view is the same tensor
            self.env[node.output[0]] = value
        else:
            self._fail(node, "dequantizes something other than an initializer or a quantized tensor")

    def _requantize(self, node, view: _View, qp: QParams) -> _View:
        n = int(np.prod(view.shape))
        buffer = self._new_buffer(node.output[0], n)
        mult, shift = quantize_multiplier(float(requant_scale(view.qp.scale, 1.0, qp.scale)))
        self._emit(Layer("requantize", node.name or node.output[0], (view.buffer,), buffer,
                         {"n": n, "in_zp": view.qp.zero_point, "out_zp": qp.zero_point, "multiplier": mult,
                          "shift": shift, "act_min": -128, "act_max": 127}))
        return _View(buffer, qp, view.shape)

    def _materialize(self, pending: _Pending, qp: QParams) -> _View:
        act_min, act_max = _clamp_range(pending.low, pending.high, qp)
        n = int(np.prod(pending.shape))
        buffer = self._new_buffer(pending.name, n)
        params = {**pending.params, "out_zp": qp.zero_point, "act_min": act_min, "act_max": act_max}
        if pending.kind == "add":
            a, b = pending.inputs
            twice_max = 2 * max(a.qp.scale, b.qp.scale)
            am, ash = quantize_multiplier(a.qp.scale / twice_max)
            bm, bsh = quantize_multiplier(b.qp.scale / twice_max)
            om, osh = quantize_multiplier(twice_max / ((1 << 20) * qp.scale))
            params.update(n=n, a_zp=a.qp.zero_point, b_zp=b.qp.zero_point, a_mult=am, a_shift=ash, b_mult=bm,
                          b_shift=bsh, out_mult=om, out_shift=osh)
            self._emit(Layer("add", pending.name, (a.buffer, b.buffer), buffer, params))
            return _View(buffer, qp, pending.shape)
        source = pending.inputs[0]
        if pending.kind == "avg_pool":
            return self._materialize_avg_pool(pending, qp, params, buffer)
        real = requant_scale(source.qp.scale, pending.w_scale, qp.scale).reshape(-1)
        pairs = [quantize_multiplier(float(r)) for r in real]
        constants = {"weights": pending.weights.astype(np.int8),
                     "multipliers": np.array([m for m, _ in pairs], np.int32),
                     "shifts": np.array([s for _, s in pairs], np.int32)}
        if pending.bias is not None:
            constants["bias"] = pending.bias.astype(np.int32)
        params["in_zp"] = source.qp.zero_point
        macs = int(pending.weights.size) * (n // pending.weights.shape[0])
        self._emit(Layer(pending.kind, pending.name, (source.buffer,), buffer, params, constants, macs))
        return _View(buffer, qp, pending.shape)

    def _materialize_avg_pool(self, pending: _Pending, qp: QParams, params: dict, buffer: str) -> _View:
        source, p = pending.inputs[0], pending.params
        window = p["k_h"] * p["k_w"]
        counts = range(1, window + 1) if p["per_count"] else (window,)
        ratio = requant_scale(source.qp.scale, 1.0, qp.scale)
        pairs = [quantize_multiplier(float(ratio) / count) for count in counts]
        constants = {"multipliers": np.array([m for m, _ in pairs], np.int32),
                     "shifts": np.array([s for _, s in pairs], np.int32)}
        self._emit(Layer("avg_pool", pending.name, (source.buffer,), buffer, {**params, "in_zp": source.qp.zero_point},
                         constants))
        return _View(buffer, qp, pending.shape)

    # --- accumulating ops -----------------------------------------------------------------------

    def _weights(self, node, index: int) -> _QConst:
        w = self._value(node, index, _QConst)
        if np.any(np.asarray(w.zero_point) != 0) or w.q.dtype != np.int8:
            self._fail(node, "weights must be int8 with zero point 0 (symmetric); quantize with WeightSymmetric")
        return w

    def _bias(self, node, index: int, in_scale: float, w_scale: np.ndarray, channels: int) -> np.ndarray | None:
        if index >= len(node.input) or not node.input[index]:
            return None
        value = self._value(node, index, _QConst, _Const)
        if isinstance(value, _QConst) and value.q.dtype == np.int32 and np.all(value.zero_point == 0):
            return np.broadcast_to(value.q, (channels,)).astype(np.int64)  # exactly what ORT's integer kernel adds
        real = value.array if isinstance(value, _Const) else \
            (value.q.astype(np.float64) - value.zero_point) * value.scale
        return np.round(np.broadcast_to(np.asarray(real, np.float64), (channels,)) / (in_scale * w_scale)).astype(np.int64)

    def _conv(self, node, attrs) -> None:
        x = self._value(node, 0, _View)
        w = self._weights(node, 1)
        if len(x.shape) != 4 or w.q.ndim != 4:
            self._fail(node, "only 2-D convolutions (NCHW) are supported")
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            self._fail(node, "auto_pad is not supported; export with explicit pads")
        _, c, h, width = x.shape
        oc, _, kh, kw = w.q.shape
        groups = int(attrs.get("group", 1))
        sh, sw = attrs.get("strides", [1, 1])
        dh, dw = attrs.get("dilations", [1, 1])
        pt, pl, pb, pr = attrs.get("pads", [0, 0, 0, 0])
        oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
        ow = (width + pl + pr - dw * (kw - 1) - 1) // sw + 1
        w_scale = np.broadcast_to(w.scale.astype(np.float64), (oc,))
        params = {"in_c": c, "in_h": h, "in_w": width, "out_c": oc, "out_h": oh, "out_w": ow, "k_h": kh, "k_w": kw,
                  "stride_h": sh, "stride_w": sw, "pad_top": pt, "pad_left": pl, "dil_h": dh, "dil_w": dw, "groups": groups}
        self.env[node.output[0]] = _Pending("conv", node.name or node.output[0], (x,), (1, oc, oh, ow), params,
                                            w.q, w_scale, self._bias(node, 2, x.qp.scale, w_scale, oc))

    def _dense(self, node, x: _View, weights: np.ndarray, w_scale: np.ndarray, bias_index: int) -> None:
        features = weights.shape[1]
        if int(np.prod(x.shape)) != features or x.shape[-1] != features:
            self._fail(node, f"expects a row of {features} features at batch 1, got shape {list(x.shape)}")
        out = weights.shape[0]
        w_scale = np.broadcast_to(w_scale.astype(np.float64), (out,))
        self.env[node.output[0]] = _Pending("dense", node.name or node.output[0], (x,), (1, out),
                                            {"in_features": features, "out_features": out}, weights, w_scale,
                                            self._bias(node, bias_index, x.qp.scale, w_scale, out))

    def _gemm(self, node, attrs) -> None:
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            self._fail(node, "only Gemm with transA=0, alpha=1, beta=1 is supported")
        w = self._weights(node, 1)
        weights, axis = (w.q, 0) if attrs.get("transB", 0) else (w.q.T, 1)
        if np.asarray(w.scale).size > 1 and w.axis != axis:
            self._fail(node, "per-channel weight scales must be along the output features")
        self._dense(node, self._value(node, 0, _View), weights, np.asarray(w.scale), 2)

    def _matmul(self, node, attrs) -> None:
        w = self._weights(node, 1)
        if w.q.ndim != 2 or (np.asarray(w.scale).size > 1 and w.axis not in (1, -1)):
            self._fail(node, "only MatMul by a constant 2-D weight with per-column scales is supported")
        self._dense(node, self._value(node, 0, _View), w.q.T, np.asarray(w.scale), 99)

    def _add(self, node, attrs) -> None:
        a, b = self._value(node, 0), self._value(node, 1)
        if isinstance(b, _Pending) and not isinstance(a, _Pending):
            a, b = b, a
        if isinstance(a, _Pending) and a.kind == "dense" and isinstance(b, (_Const, _QConst)):
            # MatMul + Add(constant): the constant is the bias
            real = b.array if isinstance(b, _Const) else (b.q.astype(np.float64) - b.zero_point) * b.scale
            extra = np.round(np.broadcast_to(np.asarray(real, np.float64).reshape(-1), (a.shape[1],))
                             / (a.inputs[0].qp.scale * a.w_scale)).astype(np.int64)
            self.env[node.output[0]] = replace(a, bias=extra if a.bias is None else a.bias + extra)
        elif isinstance(a, _View) and isinstance(b, _View):
            if a.shape != b.shape:
                self._fail(node, f"only adds tensors of the same shape (no broadcasting): {list(a.shape)} and {list(b.shape)}")
            self.env[node.output[0]] = _Pending("add", node.name or node.output[0], (a, b), a.shape, {})
        else:
            self._fail(node, "adds two quantized tensors, or a constant bias to a MatMul")

    # --- elementwise and shape ops --------------------------------------------------------------

    def _clamp(self, node, low: float, high: float) -> None:
        value = self._value(node, 0, _View, _Pending)
        if isinstance(value, _Pending):
            self.env[node.output[0]] = replace(value, low=max(value.low, low), high=min(value.high, high))
            return
        lo, hi = _clamp_range(low, high, value.qp)
        index = self.producer.get(value.buffer)
        layer = self.layers[index] if index is not None else None
        if (layer is not None and "act_min" in layer.params and self._single_reader(value.buffer)):
            # fused: the layer that wrote the buffer clamps its own output (nothing else reads it unclamped)
            params = {**layer.params, "act_min": max(layer.params["act_min"], lo), "act_max": min(layer.params["act_max"], hi)}
            self.layers[index] = replace(layer, params=params)
            self.env[node.output[0]] = value
            return
        n = int(np.prod(value.shape))
        buffer = self._new_buffer(node.output[0], n)
        self._emit(Layer("clamp", node.name or node.output[0], (value.buffer,), buffer, {"n": n, "lo": lo, "hi": hi}))
        self.env[node.output[0]] = _View(buffer, value.qp, value.shape)

    def _single_reader(self, buffer: str) -> bool:
        # the ONNX tensors viewing this buffer: the Q output, then its DQ; each read once
        names = [name for name, v in self.env.items() if isinstance(v, _View) and v.buffer == buffer]
        return sum(self.uses[name] for name in names) <= 1 + sum(1 for n in names if n in self._q_outputs())

    def _q_outputs(self) -> set[str]:
        if not hasattr(self, "_q_out_cache"):
            self._q_out_cache = {n.output[0] for n in self.graph.node if n.op_type == "QuantizeLinear"}
        return self._q_out_cache

    def _relu(self, node, attrs) -> None:
        self._clamp(node, 0.0, math.inf)

    def _clip(self, node, attrs) -> None:
        low, high = attrs.get("min", -math.inf), attrs.get("max", math.inf)
        for index, which in ((1, "low"), (2, "high")):
            if len(node.input) > index and node.input[index]:
                bound = float(np.asarray(self._value(node, index, _Const).array).reshape(()))
                low, high = (bound, high) if which == "low" else (low, bound)
        self._clamp(node, low, high)

    def _pool(self, node, attrs, kind: str, global_: bool) -> None:
        x = self._value(node, 0, _View)
        if len(x.shape) != 4:
            self._fail(node, "only 2-D pooling (NCHW) is supported")
        _, c, h, w = x.shape
        kh, kw = (h, w) if global_ else attrs["kernel_shape"]
        sh, sw = (1, 1) if global_ else attrs.get("strides", [1, 1])
        pt, pl, pb, pr = (0, 0, 0, 0) if global_ else attrs.get("pads", [0, 0, 0, 0])
        if attrs.get("ceil_mode", 0) or any(d != 1 for d in attrs.get("dilations", [1, 1])):
            self._fail(node, "ceil_mode and dilations are not supported")
        oh, ow = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
        n = c * oh * ow
        params = {"c": c, "in_h": h, "in_w": w, "out_h": oh, "out_w": ow, "k_h": kh, "k_w": kw, "stride_h": sh,
                  "stride_w": sw, "pad_top": pt, "pad_left": pl, "count_include_pad": int(attrs.get("count_include_pad", 0))}
        if kind == "avg_pool":
            # the mean waits for the QuantizeLinear after it, as Conv does: ONNX Runtime averages in float and
            # rounds once to that scale, and so does the kernel (rounding to the input's scale first, then
            # requantizing, would be several steps off when the output's scale is finer)
            params["per_count"] = int(any((pt, pl, pb, pr)) and not params["count_include_pad"])
            self.env[node.output[0]] = _Pending("avg_pool", node.name or node.output[0], (x,), (1, c, oh, ow), params)
            return
        buffer = self._new_buffer(node.output[0], n)
        self._emit(Layer(kind, node.name or node.output[0], (x.buffer,), buffer, params))
        self.env[node.output[0]] = _View(buffer, x.qp, (1, c, oh, ow))

    def _maxpool(self, node, attrs) -> None:
        self._pool(node, attrs, "max_pool", False)

    def _averagepool(self, node, attrs) -> None:
        self._pool(node, attrs, "avg_pool", False)

    def _globalaveragepool(self, node, attrs) -> None:
        self._pool(node, attrs, "avg_pool", True)

    def _reshaped(self, node, shape: tuple[int, ...]) -> None:
        value = self._value(node, 0, _View, _Pending)
        if int(np.prod(shape)) != int(np.prod(value.shape)):
            self._fail(node, f"cannot reshape {list(value.shape)} to {list(shape)}")
        self.env[node.output[0]] = replace(value, shape=tuple(int(d) for d in shape))

    def _flatten(self, node, attrs) -> None:
        shape = self._value(node, 0, _View, _Pending).shape
        axis = int(attrs.get("axis", 1)) % max(len(shape), 1)
        self._reshaped(node, (int(np.prod(shape[:axis])), int(np.prod(shape[axis:]))))

    def _reshape(self, node, attrs) -> None:
        shape = self._value(node, 0, _View, _Pending).shape
        target = [int(d) for d in np.asarray(self._value(node, 1, _Const).array).reshape(-1)]
        if not attrs.get("allowzero", 0):
            target = [shape[i] if d == 0 else d for i, d in enumerate(target)]
        if target and target[0] != 1 and -1 in target[1:]:
            target[0] = 1  # batch axis: the C code runs one row
        self._reshaped(node, tuple(np.empty(shape, np.int8).reshape(target).shape))

    def _identity(self, node, attrs) -> None:
        self.env[node.output[0]] = self._value(node, 0)

    def _softmax(self, node, attrs) -> None:
        view = self._value(node, 0, _View)
        self.env[node.output[0]] = _Final("softmax", view, int(attrs.get("axis", -1)))

    def _argmax(self, node, attrs) -> None:
        view = self._value(node, 0, _View)
        if attrs.get("select_last_index", 0):
            self._fail(node, "select_last_index is not supported")
        self.env[node.output[0]] = _Final("argmax", view, int(attrs.get("axis", 0)))
