//! Named weights: a network's parameters under EDM's `state_dict` names, read from and written
//! to safetensors. Loading checks every tensor: a missing, unexpected or mis-shaped one is an
//! error naming the file, the tensor and both shapes.
//!
//! Parameter ids are derived from (namespace, name), so a network rebuilt from the same file
//! gets the same ids (optimiser state saved by id then matches on resume) and networks built
//! from one checkpoint under different namespaces (real score, fake score, generator) never
//! share ids, gradients or optimiser state.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::{Tensor, TensorData};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

/// A float32 tensor on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Self { shape, data }
    }

    pub fn from_tensor<const D: usize>(t: Tensor<D>) -> Self {
        let shape = t.dims().to_vec();
        let data = t.into_data().convert::<f32>().try_into_vec::<f32>().expect("float32 data");
        Self { shape, data }
    }

    pub fn to_tensor<const D: usize>(&self, device: &burn::tensor::Device) -> Tensor<D> {
        Tensor::from_data(TensorData::new(self.data.clone(), self.shape.clone()), device)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    #[error("{path}: {msg}")]
    Io { path: String, msg: String },
    #[error("{path}: not a valid safetensors file: {msg}")]
    Format { path: String, msg: String },
    #[error("{path}: tensor `{key}` has dtype {dtype}; only F32, F64, F16, BF16, I64, I32 and U8 are read")]
    DType { path: String, key: String, dtype: String },
    #[error("{path}: missing tensor `{key}` (the network expects shape {expected:?}){more}")]
    Missing { path: String, key: String, expected: Vec<usize>, more: String },
    #[error("{path}: tensor `{key}` has shape {found:?} in the file but the network expects {expected:?}{more}")]
    Shape { path: String, key: String, found: Vec<usize>, expected: Vec<usize>, more: String },
    #[error("{path}: unexpected tensor `{key}` with shape {found:?}: the network has no such parameter (wrong config?){more}")]
    Unexpected { path: String, key: String, found: Vec<usize>, more: String },
    #[error("{path}: tensor `{key}` holds a non-finite value")]
    NonFinite { path: String, key: String },
}

/// Tensors by name, as in a safetensors file.
#[derive(Clone, Debug, Default)]
pub struct NamedTensors {
    pub tensors: BTreeMap<String, HostTensor>,
    pub metadata: HashMap<String, String>,
}

impl NamedTensors {
    pub fn get(&self, key: &str) -> Option<&HostTensor> {
        self.tensors.get(key)
    }

    pub fn insert(&mut self, key: impl Into<String>, t: HostTensor) {
        self.tensors.insert(key.into(), t);
    }

    /// Reads a safetensors file; F64/F16/BF16 tensors are converted to F32.
    pub fn read(path: &Path) -> Result<Self, WeightError> {
        let p = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| WeightError::Io { path: p.clone(), msg: e.to_string() })?;
        Self::from_bytes(&bytes, &p)
    }

    /// A safetensors file's `__metadata__` alone, from its header (the tensors are not read).
    pub fn read_metadata(path: &Path) -> Result<HashMap<String, String>, WeightError> {
        use std::io::Read;
        let p = path.display().to_string();
        let io = |e: std::io::Error| WeightError::Io { path: p.clone(), msg: e.to_string() };
        let format = |msg: String| WeightError::Format { path: p.clone(), msg };
        let mut file = std::fs::File::open(path).map_err(io)?;
        let mut len = [0u8; 8];
        file.read_exact(&mut len).map_err(|e| format(format!("no header: {e}")))?;
        let len = u64::from_le_bytes(len);
        if len > 100_000_000 {
            return Err(format(format!("header of {len} bytes")));
        }
        // Read, not preallocated: a length field larger than the file costs no memory.
        let mut header = Vec::new();
        file.take(len).read_to_end(&mut header).map_err(io)?;
        if header.len() as u64 != len {
            return Err(format(format!("truncated header: {} of its {len} bytes", header.len())));
        }
        let json: serde_json::Value = serde_json::from_slice(&header).map_err(|e| format(format!("header is not JSON: {e}")))?;
        match json.get("__metadata__") {
            None => Ok(HashMap::new()),
            Some(m) => serde_json::from_value(m.clone()).map_err(|e| format(format!("__metadata__: {e}"))),
        }
    }

    pub fn from_bytes(bytes: &[u8], path: &str) -> Result<Self, WeightError> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| WeightError::Format { path: path.into(), msg: truncation(bytes).unwrap_or(e.to_string()) })?;
        let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| WeightError::Format { path: path.into(), msg: e.to_string() })?;
        let mut out = NamedTensors { metadata: meta.metadata().clone().unwrap_or_default(), ..Default::default() };
        for (name, view) in st.tensors() {
            let data = view_to_f32(&view).ok_or_else(|| WeightError::DType {
                path: path.into(),
                key: name.clone(),
                dtype: format!("{:?}", view.dtype()),
            })?;
            out.tensors.insert(name, HostTensor::new(view.shape().to_vec(), data));
        }
        Ok(out)
    }

    /// Writes a safetensors file atomically (temporary file, then rename), so an interrupted
    /// write never leaves a half-written checkpoint behind.
    pub fn write(&self, path: &Path) -> Result<(), WeightError> {
        let p = path.display().to_string();
        let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = self
            .tensors
            .iter()
            .map(|(k, t)| (k.clone(), t.data.iter().flat_map(|v| v.to_le_bytes()).collect(), t.shape.clone()))
            .collect();
        let views: Vec<(String, TensorView)> = bytes
            .iter()
            .map(|(k, b, s)| (k.clone(), TensorView::new(Dtype::F32, s.clone(), b).expect("consistent view")))
            .collect();
        let meta = (!self.metadata.is_empty()).then(|| self.metadata.clone());
        let buf = safetensors::serialize(views, meta).map_err(|e| WeightError::Io { path: p.clone(), msg: e.to_string() })?;
        write_atomic(path, &buf).map_err(|e| WeightError::Io { path: p, msg: e.to_string() })
    }
}

/// For a file shorter than its header says (cut off while copied or written): the first tensor
/// whose data is missing.
fn truncation(bytes: &[u8]) -> Option<String> {
    let n = usize::try_from(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?)).ok()?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(bytes.get(8..8usize.checked_add(n)?)?).ok()?;
    let have = bytes.len() - 8 - n;
    let (start, key, end) = header
        .iter()
        .filter_map(|(k, v)| Some((v["data_offsets"][0].as_u64()?, k, v["data_offsets"][1].as_u64()?)))
        .filter(|&(_, _, end)| end > have as u64)
        .min()?;
    Some(format!("truncated: the data of tensor `{key}` spans bytes {start}..{end}, the file holds {have}"))
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        // On disk before the rename makes it visible: a crash leaves the old file or the new.
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    sync_parent(path)
}

/// Makes a rename in `path`'s folder durable (fsync of the folder; a no-op off Unix).
pub fn sync_parent(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn view_to_f32(view: &TensorView) -> Option<Vec<f32>> {
    let b = view.data();
    Some(match view.dtype() {
        Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F64 => b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32).collect(),
        Dtype::F16 => b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::BF16 => b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        // Integer tensors (indices, labels) are read as float32 too: exact below 2^24.
        Dtype::I64 => b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32).collect(),
        Dtype::I32 => b.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f32).collect(),
        Dtype::U8 => b.iter().map(|&v| v as f32).collect(),
        _ => return None,
    })
}

/// Joins the module path, leaving out enum variants (`Backbone::Dhariwal`, layer kinds), which
/// have no counterpart in EDM's names.
#[derive(Default)]
struct PathStack(Vec<Option<String>>);

impl PathStack {
    fn enter(&mut self, name: &str, container: &str) {
        self.0.push((!container.starts_with("Enum:")).then(|| name.to_string()));
    }
    fn exit(&mut self) {
        self.0.pop();
    }
    fn key(&self) -> String {
        self.0.iter().flatten().cloned().collect::<Vec<_>>().join(".")
    }
}

/// The path bookkeeping shared by every named visitor and mapper (a `path: PathStack` field).
macro_rules! track_path {
    () => {
        fn enter_module(&mut self, name: &str, container: &str) {
            self.path.enter(name, container);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.exit();
        }
    };
}

/// A stable 64-bit id for a parameter: FNV-1a of "namespace/name".
pub fn param_id(namespace: &str, key: &str) -> ParamId {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in namespace.bytes().chain(std::iter::once(b'/')).chain(key.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    ParamId::from(h)
}

struct Collector {
    path: PathStack,
    out: NamedTensors,
}

impl ModuleVisitor for Collector {
    track_path!();
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.out.insert(self.path.key(), HostTensor::from_tensor(param.val()));
    }
}

/// Every parameter (and EDM buffer) of `module` under its EDM name.
pub fn named_tensors<M: Module>(module: &M) -> NamedTensors {
    let mut c = Collector { path: PathStack::default(), out: NamedTensors::default() };
    module.visit(&mut c);
    c.out
}

/// Names and shapes of every parameter of `module`.
pub fn named_shapes<M: Module>(module: &M) -> BTreeMap<String, Vec<usize>> {
    struct Shapes {
        path: PathStack,
        out: BTreeMap<String, Vec<usize>>,
    }
    impl ModuleVisitor for Shapes {
        track_path!();
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.out.insert(self.path.key(), param.lazy_shape().to_vec());
        }
    }
    let mut s = Shapes { path: PathStack::default(), out: BTreeMap::new() };
    module.visit(&mut s);
    s.out
}

struct Loader<'a> {
    path: PathStack,
    source: &'a NamedTensors,
    namespace: &'a str,
}

impl ModuleMapper for Loader<'_> {
    track_path!();
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let key = self.path.key();
        let t = self.source.get(&key).expect("checked before loading");
        let device = param.lazy_device();
        // Weights live for the whole run: in CubeCL's persistent pool on a CubeCL device.
        let tensor = crate::fused_update::persistent(&device, || t.to_tensor::<D>(&device));
        param.transform_for_load(tensor, param_id(self.namespace, &key))
    }
}

/// Loads `source` into `module`, which must have exactly the same tensor names and shapes.
/// `file` names the source in errors; `namespace` seeds the parameter ids.
pub fn load_named<M: Module>(module: M, source: &NamedTensors, file: &str, namespace: &str) -> Result<M, WeightError> {
    let expected = named_shapes(&module);
    let mut problems: Vec<WeightError> = Vec::new();
    for (key, shape) in &expected {
        match source.get(key) {
            None => problems.push(WeightError::Missing { path: file.into(), key: key.clone(), expected: shape.clone(), more: String::new() }),
            Some(t) if &t.shape != shape => problems.push(WeightError::Shape {
                path: file.into(),
                key: key.clone(),
                found: t.shape.clone(),
                expected: shape.clone(),
                more: String::new(),
            }),
            Some(t) if t.data.iter().any(|v| !v.is_finite()) => {
                problems.push(WeightError::NonFinite { path: file.into(), key: key.clone() })
            }
            Some(_) => {}
        }
    }
    let known: BTreeSet<&String> = expected.keys().collect();
    for (key, t) in &source.tensors {
        if !known.contains(key) {
            problems.push(WeightError::Unexpected { path: file.into(), key: key.clone(), found: t.shape.clone(), more: String::new() });
        }
    }
    if let Some(first) = first_with_count(problems) {
        return Err(first);
    }
    let mut loader = Loader { path: PathStack::default(), source, namespace };
    Ok(module.map(&mut loader))
}

/// The first problem, noting how many more there were.
fn first_with_count(mut problems: Vec<WeightError>) -> Option<WeightError> {
    if problems.is_empty() {
        return None;
    }
    let extra = problems.len() - 1;
    let mut first = problems.swap_remove(0);
    if extra > 0 {
        let note = format!(" (and {extra} more tensor problem{})", if extra == 1 { "" } else { "s" });
        match &mut first {
            WeightError::Missing { more, .. } | WeightError::Shape { more, .. } | WeightError::Unexpected { more, .. } => *more = note,
            _ => {}
        }
    }
    Some(first)
}

struct IdAssigner<'a> {
    path: PathStack,
    namespace: &'a str,
}

impl ModuleMapper for IdAssigner<'_> {
    track_path!();
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let id = param_id(self.namespace, &self.path.key());
        let (_, tensor, mapper) = param.consume();
        Param::from_mapped_value(id, tensor, mapper)
    }
}

/// Gives every parameter the id derived from (namespace, name); the values are untouched.
pub fn assign_ids<M: Module>(module: M, namespace: &str) -> M {
    module.map(&mut IdAssigner { path: PathStack::default(), namespace })
}

/// An independent copy of `module`: same values, its own parameter ids (derived from
/// `namespace`) and its own autodiff leaves. Burn's `clone()` would share both.
pub fn fork_named<M: Module>(module: &M, namespace: &str) -> M {
    struct Detach<'a> {
        path: PathStack,
        namespace: &'a str,
    }
    impl ModuleMapper for Detach<'_> {
        track_path!();
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let id = param_id(self.namespace, &self.path.key());
            let require_grad = param.is_require_grad();
            let (_, tensor, mapper) = param.consume();
            // A fresh leaf: copy the values out of any graph, keep the trainability.
            let tensor = Tensor::from_data(tensor.to_data(), &tensor.device()).set_require_grad(require_grad);
            Param::from_mapped_value(id, tensor, mapper)
        }
    }
    module.clone().map(&mut Detach { path: PathStack::default(), namespace })
}

/// `module` with every parameter's values in CubeCL's persistent pool on a CubeCL device
/// (`fused_update::persistent`: weights that live for a run kept out of the pages activations
/// are carved from; a randomly initialised network's are not, until its first update or this);
/// ids and trainability kept; unchanged elsewhere.
pub fn into_persistent_pool<M: Module>(module: M) -> M {
    struct ToPool;
    impl ModuleMapper for ToPool {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let require_grad = param.is_require_grad();
            let (id, tensor, mapper) = param.consume();
            let autodiff = tensor.device().is_autodiff();
            let pooled = crate::fused_update::into_persistent_pool(tensor.inner());
            let tensor = if autodiff { Tensor::from_inner(pooled).set_require_grad(require_grad) } else { pooled };
            Param::from_mapped_value(id, tensor, mapper)
        }
    }
    module.map(&mut ToPool)
}

/// Every parameter of `module`, flattened to 1-D and without autodiff, by EDM name.
pub fn flat_params<M: Module>(module: &M) -> BTreeMap<String, Tensor<1>> {
    struct Flat {
        path: PathStack,
        out: BTreeMap<String, Tensor<1>>,
    }
    impl ModuleVisitor for Flat {
        track_path!();
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.out.insert(self.path.key(), param.val().inner().reshape([-1]));
        }
    }
    let mut f = Flat { path: PathStack::default(), out: BTreeMap::new() };
    module.visit(&mut f);
    f.out
}

/// Replaces every parameter value by `f(name, value flattened to 1-D)` (reshaped back); ids,
/// trainability and devices are kept.
pub fn map_params_flat<M: Module>(module: M, f: impl FnMut(&str, Tensor<1>) -> Tensor<1>) -> M {
    struct MapFlat<F> {
        path: PathStack,
        f: F,
    }
    impl<F: FnMut(&str, Tensor<1>) -> Tensor<1>> ModuleMapper for MapFlat<F> {
        track_path!();
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let key = self.path.key();
            let f = &mut self.f;
            param.map(|t| {
                let dims = t.dims();
                f(&key, t.reshape([-1])).reshape(dims)
            })
        }
    }
    module.map(&mut MapFlat { path: PathStack::default(), f })
}
