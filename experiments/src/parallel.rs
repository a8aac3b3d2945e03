//! Data parallelism: how a training step's global batch is cut into parts whose gradients are
//! summed before the one optimiser step.
//!
//! - `train.micro_batches`: parts run one after another on one device (a batch larger than the
//!   device's memory).
//! - `train.devices`: one replica of the networks per device, each in its own thread, each
//!   running its share of the parts; the replicas sum their gradients (and loss values) with
//!   an all-reduce and take the same optimiser step, so their weights stay identical. On CUDA
//!   the all-reduce is Burn's (`burn::tensor::distributed::all_reduce`, NCCL); Burn 0.22's CPU
//!   backends have none, so there the replicas share the one CPU device and sum through host
//!   memory ([`HostSum`]), which exercises the same loop in tests.
//!
//! Every draw of a step is made for the whole batch first, in one fixed order (each replica
//! makes all of them); a part only chooses rows of it, and each loss (a mean over its rows) is
//! weighted by its share of the batch. So the number of parts changes the result only by float
//! rounding (and dropout masks, drawn per part; tests in `teacher_training.rs` and
//! `distill_pipeline.rs`), the checkpoint does not depend on it, and a run may resume with
//! another number of micro-batches or devices.

use crate::device::Backend;
use anyhow::{bail, Result};
use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::distributed::{all_reduce, ReduceOperation};
use burn::tensor::{Device, Tensor, TensorData};
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex};

/// A batch of `total` rows cut into `count` contiguous parts of near-equal size.
#[derive(Clone, Copy, Debug)]
pub struct Shards {
    pub total: usize,
    pub count: usize,
}

impl Shards {
    pub fn new(total: usize, count: usize) -> Self {
        Self { total, count: count.max(1) }
    }

    /// The rows of part `i`: the first `total % count` parts hold one row more.
    pub fn rows(&self, i: usize) -> Range<usize> {
        let (base, extra) = (self.total / self.count, self.total % self.count);
        let start = i * base + i.min(extra);
        start..start + base + usize::from(i < extra)
    }

    /// Part `i`'s share of the batch: the weight of its (batch-mean) losses.
    pub fn weight(&self, i: usize) -> f64 {
        self.rows(i).len() as f64 / self.total as f64
    }
}

/// This replica's place in a (data-parallel) run, and how the replicas sum their values.
#[derive(Clone)]
pub struct Replica {
    pub rank: usize,
    pub world: usize,
    collective: Collective,
}

#[derive(Clone)]
enum Collective {
    Single,
    /// Burn's all-reduce over these devices (one per replica).
    Burn(Vec<Device>),
    Host(Arc<HostSum>),
}

impl Replica {
    /// The only replica of a one-device run.
    pub fn single() -> Self {
        Self { rank: 0, world: 1, collective: Collective::Single }
    }

    /// The replicas of a run on `n` devices of `backend`, and their devices: CUDA GPUs 0..n
    /// summing with Burn's collective, or on the CPU backends `n` replicas of the one device
    /// summing through host memory.
    pub fn group(backend: Backend, n: usize) -> Result<Vec<(Replica, Device)>> {
        let devices = (0..n).map(|i| backend.device_at(i)).collect::<Result<Vec<_>>>()?;
        if backend == Backend::Cuda && n > 1 {
            // A missing GPU must fail here, once: a replica failing later leaves the others
            // waiting in NCCL.
            for (i, d) in devices.iter().enumerate() {
                let probe = std::panic::catch_unwind(|| Tensor::<1>::zeros([1], d).into_data());
                if probe.is_err() {
                    bail!("train.devices = {n}: CUDA device {i} is not usable (how many GPUs does this machine have?)");
                }
            }
        }
        let collective = match (n, backend) {
            (1, _) => Collective::Single,
            (_, Backend::Cuda) => Collective::Burn(devices.clone()),
            _ => Collective::Host(Arc::new(HostSum::new(n))),
        };
        Ok(devices.into_iter().enumerate().map(|(rank, d)| (Replica { rank, world: n, collective: collective.clone() }, d)).collect())
    }

    /// The one replica that writes files (metrics, checkpoints, samples).
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// A batch of `total` rows as `micro_batches` parts per replica: all parts, and this
    /// replica's.
    pub fn parts(&self, total: usize, micro_batches: usize) -> (Shards, Range<usize>) {
        let m = micro_batches.max(1);
        (Shards::new(total, self.world * m), self.rank * m..(self.rank + 1) * m)
    }

    /// The sum of `t` over the replicas (every replica calls it, in the same order).
    pub fn sum<const D: usize>(&self, t: Tensor<D>) -> Tensor<D> {
        match &self.collective {
            Collective::Single => t,
            Collective::Burn(devices) => all_reduce(t, ReduceOperation::Sum, devices.clone()).resolve(),
            Collective::Host(h) => {
                let (device, shape) = (t.device(), t.shape());
                let summed = h.sum(self.rank, t.into_data().convert::<f32>().try_into_vec::<f32>().expect("float tensor"));
                Tensor::from_data(TensorData::new(summed, shape), &device)
            }
        }
    }

    /// Sums `values` over the replicas, in place (in float32).
    pub fn sum_values(&self, values: &mut [f64]) {
        let v: Vec<f32> = values.iter().map(|&v| v as f32).collect();
        let summed = match &self.collective {
            Collective::Single => return,
            Collective::Burn(devices) => {
                let t = Tensor::<1>::from_data(TensorData::new(v, [values.len()]), &devices[self.rank]);
                self.sum(t).into_data().convert::<f32>().try_into_vec::<f32>().expect("float tensor")
            }
            Collective::Host(h) => h.sum(self.rank, v),
        };
        values.iter_mut().zip(summed).for_each(|(v, s)| *v = s as f64);
    }

    /// Sums a step's [`Backprop`] over the replicas: the loss value, and the gradients unless
    /// the summed loss is NaN/Inf (then every replica skips the update alike). Fails when
    /// another replica failed (see [`Replica::abort`]).
    pub fn reduce<N: Module, H: Module>(&self, bp: &mut Backprop, net: &N, head: Option<&H>) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        let mut loss = [bp.loss];
        self.sum_values(&mut loss);
        bp.loss = loss[0];
        if !bp.loss.is_finite() {
            bp.grads = None;
            bp.head_grads = None;
        } else {
            bp.grads = bp.grads.take().map(|g| self.sum_grads(g, net));
            if let Some(head) = head {
                bp.head_grads = bp.head_grads.take().map(|g| self.sum_grads(g, head));
            }
        }
        match &self.collective {
            Collective::Host(h) if h.aborted() => bail!(RELEASED),
            _ => Ok(()),
        }
    }

    /// Sums every gradient of `module` over the replicas, in one all-reduce of all of them
    /// laid end to end (all replicas hold gradients of the same parameters: the same network
    /// ran on rows of the same batch; the flattened size is checked by the sum).
    fn sum_grads<M: Module>(&self, mut grads: GradientsParams, module: &M) -> GradientsParams {
        struct Take<'a> {
            grads: &'a mut GradientsParams,
            flat: Vec<Tensor<1>>,
            shapes: Vec<(ParamId, Vec<usize>)>,
        }
        impl ModuleVisitor for Take<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                if let Some(g) = self.grads.remove::<D>(param.id) {
                    self.shapes.push((param.id, g.dims().to_vec()));
                    self.flat.push(g.flatten(0, D - 1));
                }
            }
        }
        struct Give<'a> {
            grads: &'a mut GradientsParams,
            total: Tensor<1>,
            shapes: std::slice::Iter<'a, (ParamId, Vec<usize>)>,
            next: Option<&'a (ParamId, Vec<usize>)>,
            offset: usize,
        }
        impl ModuleVisitor for Give<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                if let Some((id, shape)) = self.next.filter(|(id, _)| *id == param.id) {
                    let n: usize = shape.iter().product();
                    let dims: [usize; D] = shape.clone().try_into().expect("the rank of this parameter");
                    self.grads.register(*id, self.total.clone().narrow(0, self.offset, n).reshape(dims));
                    self.offset += n;
                    self.next = self.shapes.next();
                }
            }
        }
        let mut take = Take { grads: &mut grads, flat: Vec::new(), shapes: Vec::new() };
        module.visit(&mut take);
        let (flat, shapes) = (take.flat, take.shapes);
        if flat.is_empty() {
            return grads;
        }
        let total = self.sum(Tensor::cat(flat, 0));
        let mut iter = shapes.iter();
        let next = iter.next();
        module.visit(&mut Give { grads: &mut grads, total, shapes: iter, next, offset: 0 });
        grads
    }

    /// Runs this replica's share of a run: on an error or a panic (reported as an error) the
    /// other replicas are released (see [`Replica::abort`]) instead of waiting for it forever.
    pub fn run(&self, f: impl FnOnce(&Replica) -> Result<()>) -> Result<()> {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self)))
            .unwrap_or_else(|panic| {
                let msg = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
                Err(anyhow::anyhow!("replica {}: internal error: {}", self.rank, msg.unwrap_or_default()))
            });
        if result.is_err() {
            self.abort();
        }
        result
    }

    /// Releases the other replicas from a sum this one will never join (it failed): their
    /// sums return at once and their next [`Replica::reduce`] fails. Burn's collective cannot be
    /// released this way (a CUDA run whose replica fails hangs in NCCL: stop it).
    pub fn abort(&self) {
        if let Collective::Host(h) = &self.collective {
            h.abort();
        }
    }
}

/// Runs a data-parallel job: `main_work` as the main replica on this thread, and
/// `work(replica, device)` for each of the `others` in a thread of its own; a failing replica
/// releases the rest (see [`Replica::run`]). The error reported is a replica's own failure
/// rather than the "another replica failed" of those it released.
pub fn run_replicas<W>(main: &Replica, main_work: impl FnOnce() -> Result<()>, others: Vec<(Replica, Device)>, work: W) -> Result<()>
where
    W: Fn(&Replica, Device) -> Result<()> + Sync,
{
    std::thread::scope(|scope| {
        let work = &work;
        let workers: Vec<_> = others.into_iter().map(|(replica, device)| scope.spawn(move || replica.run(|r| work(r, device)))).collect();
        let result = main.run(|_| main_work());
        let joined = workers.into_iter().map(|w| w.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a replica's thread panicked"))));
        let errors: Vec<anyhow::Error> = std::iter::once(result).chain(joined).filter_map(Result::err).collect();
        match errors.iter().position(|e| !is_release(e)) {
            Some(i) => Err(errors.into_iter().nth(i).expect("in range")),
            None => errors.into_iter().next().map_or(Ok(()), Err),
        }
    })
}

/// The error of a replica released by [`Replica::abort`].
const RELEASED: &str = "another replica failed";

/// Whether `e` is a released replica's error rather than a failure of its own.
fn is_release(e: &anyhow::Error) -> bool {
    e.to_string() == RELEASED
}

/// An all-reduce (sum) between the threads of this process through host memory, for the CPU
/// backends, which have no collective in Burn 0.22. Sums in rank order: deterministic.
pub struct HostSum {
    state: Mutex<HostSumState>,
    changed: Condvar,
}

struct HostSumState {
    round: u64,
    parts: Vec<Option<Vec<f32>>>,
    result: Option<Vec<f32>>,
    readers: usize,
    aborted: bool,
}

impl HostSum {
    fn new(world: usize) -> Self {
        let state = HostSumState { round: 0, parts: vec![None; world], result: None, readers: 0, aborted: false };
        Self { state: Mutex::new(state), changed: Condvar::new() }
    }

    /// The sum of every replica's `values`; `values` itself once aborted.
    fn sum(&self, rank: usize, values: Vec<f32>) -> Vec<f32> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.aborted {
            return values;
        }
        // Wait until the previous round's result has been read by everyone.
        while s.result.is_some() && !s.aborted {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        let round = s.round;
        s.parts[rank] = Some(values);
        if s.parts.iter().all(Option::is_some) {
            let sizes: Vec<usize> = s.parts.iter().flatten().map(Vec::len).collect();
            if sizes.iter().any(|&n| n != sizes[0]) {
                // A bug, not an input error: release the others with their own parts.
                s.aborted = true;
                self.changed.notify_all();
                drop(s);
                panic!("replicas summed tensors of different sizes: {sizes:?}");
            }
            let parts: Vec<Vec<f32>> = s.parts.iter_mut().map(|p| p.take().expect("checked")).collect();
            let mut total = parts[0].clone();
            for p in &parts[1..] {
                total.iter_mut().zip(p).for_each(|(t, v)| *t += v);
            }
            s.result = Some(total);
            s.readers = 0;
            s.round += 1;
            self.changed.notify_all();
        }
        while s.round == round && !s.aborted {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        if s.round == round {
            // Aborted before every replica's part arrived.
            return s.parts[rank].take().expect("this replica's part");
        }
        let out = s.result.clone().expect("set by the last replica");
        s.readers += 1;
        if s.readers == s.parts.len() {
            s.result = None;
            self.changed.notify_all();
        }
        out
    }

    fn aborted(&self) -> bool {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).aborted
    }

    fn abort(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.aborted = true;
        self.changed.notify_all();
    }
}

/// Rows `rows` of `t` (first axis).
pub fn rows<const D: usize>(t: &Tensor<D>, rows: &Range<usize>) -> Tensor<D> {
    t.clone().narrow(0, rows.start, rows.len())
}

/// A loss summed over a step's micro-batches and the gradients it sent into one network (and
/// the GAN classifier's head, which shares the fake score's loss).
#[derive(Default)]
pub struct Backprop {
    pub loss: f64,
    pub grads: Option<GradientsParams>,
    pub head_grads: Option<GradientsParams>,
}

impl Backprop {
    /// Adds one micro-batch's `loss`, already weighted by its share of the batch: its value,
    /// and its gradients into `net` (and `head`), unless the sum so far is NaN/Inf (the update
    /// will be skipped, so no backward pass is spent on it).
    pub fn add<N: Module, H: Module>(&mut self, loss: Tensor<1>, net: &N, head: Option<&H>) {
        self.loss += loss.clone().into_scalar::<f64>();
        if !self.loss.is_finite() {
            return;
        }
        let mut grads = loss.backward();
        let g = GradientsParams::from_module(&mut grads, net);
        self.grads = Some(add_grads(self.grads.take(), g, net));
        if let Some(head) = head {
            let g = GradientsParams::from_module(&mut grads, head);
            self.head_grads = Some(add_grads(self.head_grads.take(), g, head));
        }
    }
}

/// `sum + more`, parameter by parameter of `module`.
pub fn add_grads<M: Module>(sum: Option<GradientsParams>, mut more: GradientsParams, module: &M) -> GradientsParams {
    let Some(mut sum) = sum else { return more };
    struct Add<'a> {
        sum: &'a mut GradientsParams,
        more: &'a mut GradientsParams,
    }
    impl ModuleVisitor for Add<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.more.remove::<D>(param.id) {
                let total = match self.sum.remove::<D>(param.id) {
                    Some(s) => s + g,
                    None => g,
                };
                self.sum.register(param.id, total);
            }
        }
    }
    module.visit(&mut Add { sum: &mut sum, more: &mut more });
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_sum_adds_in_rank_order_round_after_round() {
        let replicas = Replica::group(Backend::Cpu, 3).unwrap();
        let sums: Vec<Vec<f32>> = std::thread::scope(|s| {
            let handles: Vec<_> = replicas
                .iter()
                .map(|(r, device)| {
                    s.spawn(move || {
                        (0..50)
                            .map(|round| {
                                let t = Tensor::<1>::from_data(TensorData::new(vec![r.rank as f32 + round as f32, 1.0], [2]), device);
                                r.sum(t).into_data().try_to_vec::<f32>().unwrap()[0]
                            })
                            .collect::<Vec<f32>>()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for got in &sums {
            let want: Vec<f32> = (0..50).map(|round| (3 + 3 * round) as f32).collect();
            assert_eq!(got, &want);
        }
    }

    #[test]
    fn a_failed_replica_releases_the_others_and_its_error_is_reported() {
        let mut replicas = Replica::group(Backend::Cpu, 3).unwrap();
        let (main, device) = replicas.remove(0);
        let sum_once = |r: &Replica, device: &Device| {
            let mut bp = Backprop { loss: 1.0, ..Default::default() };
            let net = burn::nn::LinearConfig::new(2, 2).init(device);
            r.reduce(&mut bp, &net, None::<&burn::nn::Linear>)
        };
        let main_result = std::sync::Mutex::new(None);
        let result = run_replicas(
            &main,
            || {
                let r = sum_once(&main, &device);
                *main_result.lock().unwrap() = Some(r.as_ref().map_err(|e| e.to_string()).err());
                r
            },
            replicas,
            |r, device| if r.rank == 1 { anyhow::bail!("disk full") } else { sum_once(r, &device) },
        );
        assert_eq!(result.unwrap_err().to_string(), "disk full");
        assert_eq!(main_result.into_inner().unwrap(), Some(Some(RELEASED.to_string())));
    }

    #[test]
    fn shards_cover_the_batch_once_in_order() {
        for (total, count) in [(32, 1), (32, 4), (10, 3), (5, 5), (7, 2)] {
            let s = Shards::new(total, count);
            let all: Vec<usize> = (0..count).flat_map(|i| s.rows(i)).collect();
            assert_eq!(all, (0..total).collect::<Vec<_>>(), "{total} rows in {count}");
            let w: f64 = (0..count).map(|i| s.weight(i)).sum();
            assert!((w - 1.0).abs() < 1e-12);
            let sizes: Vec<usize> = (0..count).map(|i| s.rows(i).len()).collect();
            assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1, "{sizes:?}");
        }
    }
}
