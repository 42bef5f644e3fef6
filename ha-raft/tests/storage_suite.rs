//! openraft's own storage test suite on the sled log store and state machine.

use ha_raft::testing::{open_db, Identity, LogStore, StateMachineStore};
use ha_raft::TypeConfig;
use openraft::testing::{StoreBuilder, Suite};
use openraft::{StorageError, StorageIOError};

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for SledBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError<u64>> {
        let io = |e: &dyn std::error::Error| -> StorageError<u64> {
            StorageIOError::<u64>::write(&std::io::Error::other(e.to_string())).into()
        };
        let dir = tempfile::tempdir().map_err(|e| io(&e))?;
        let identity = Identity {
            cluster_id: "suite".into(),
            node_id: 0,
        };
        let db = open_db(dir.path(), &identity, 1 << 20)
            .await
            .map_err(|e| io(&e))?;
        let logs = LogStore::new(&db).map_err(|e| io(&e))?;
        let sm = StateMachineStore::new(&db).map_err(|e| io(&e))?;
        Ok((dir, logs, sm))
    }
}

#[test]
fn sled_store_passes_openraft_suite() {
    if let Err(e) = Suite::test_all(SledBuilder) {
        panic!("openraft storage suite failed: {e}");
    }
}
