//! What the crate's unit tests share: a state built by applying commands as the Raft log does.

use flotilla_core::state::{Applied, Command, Envelope, State, WorkerInfo, apply};

/// A local worker `index` as it registers (`i-<index>`, data port `127.0.0.1:<9000 + index>`;
/// one pool for all).
pub fn worker_info(index: u64) -> WorkerInfo {
    WorkerInfo {
        cpus: 1,
        gpus: 0,
        memory_bytes: 0,
        instance_id: format!("i-{index}"),
        instance_type: "local".into(),
        zone: "local".into(),
        hostname: "h".into(),
        data_addr: format!("127.0.0.1:{}", 9000 + index),
    }
}

/// A test's Raft log: commands applied to `state` 100 ms apart.
#[derive(Clone)]
pub struct Log {
    pub state: State,
    at_ms: u64,
}

impl Log {
    /// Job 1 (a gang of 2) submitted, and workers 1..=`workers` registered.
    pub fn job_of_two(workers: u64) -> Log {
        let mut log = Log { state: State::default(), at_ms: 0 };
        let spec = flotilla_core::spec::JobSpec::from_toml_str(
            "name = \"j\"\nmodel = { kind = \"mlp\" }\ndata = { train = \"synthetic:blobs\" }\nworkers = { min = 2 }\n",
        )
        .expect("spec");
        log.step(Command::SubmitJob { spec: Box::new(spec), client_request_id: "r".into() });
        for i in 1..=workers {
            log.register(i);
        }
        log
    }

    pub fn step(&mut self, command: Command) -> Applied {
        self.at_ms += 100;
        apply(&mut self.state, self.at_ms, Envelope::new(self.at_ms, command)).expect("applies")
    }

    /// Job 1 (a gang of 2, as [`Log::job_of_two`]), then job 2 (a gang of 1 keeping `spares`
    /// warm spares) submitted, and workers 1..=`workers` registered.
    pub fn job_of_two_and_a_spared_job(spares: u32, workers: u64) -> Log {
        let mut log = Log::job_of_two(0);
        let spec = flotilla_core::spec::JobSpec::from_toml_str(&format!(
            "name = \"s\"\nmodel = {{ kind = \"mlp\" }}\ndata = {{ train = \"synthetic:blobs\" }}\n\
             workers = {{ min = 1, max = 1 }}\ncapacity = {{ spares = {spares} }}\n"
        ))
        .expect("spec");
        log.step(Command::SubmitJob { spec: Box::new(spec), client_request_id: "s".into() });
        for i in 1..=workers {
            log.register(i);
        }
        log
    }

    /// Registers worker `index` (ids are given in registration order).
    pub fn register(&mut self, index: u64) {
        self.step(Command::RegisterWorker { info: worker_info(index), credential_sha256: String::new() });
    }
}
