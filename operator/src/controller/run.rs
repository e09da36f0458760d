//! The identity of the FederatedTune being reconciled: its name, namespace,
//! UID, keys in the store and the owner reference its children carry.

use heterotune_crds::layout::RunLayout;
use heterotune_crds::FederatedTune;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::{Resource, ResourceExt};

use super::error::{Error, Result};
use crate::protocol::observe::{storage_prefix, RunRef};

/// The identity of the FederatedTune being reconciled.
#[derive(Debug, Clone)]
pub struct Run<'a> {
    /// The object.
    pub ft: &'a FederatedTune,
    /// Its name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// Its UID.
    pub uid: String,
    /// Its keys in the store.
    pub layout: RunLayout,
    /// The owner reference its children carry.
    pub owner: OwnerReference,
}

impl<'a> Run<'a> {
    /// Collects the identity of `ft` (which came from the API server).
    pub fn new(ft: &'a FederatedTune) -> Result<Run<'a>> {
        let namespace = ft.namespace().ok_or(Error::MissingObjectKey("namespace"))?;
        let uid = ft.uid().ok_or(Error::MissingObjectKey("uid"))?;
        let owner = ft
            .controller_owner_ref(&())
            .ok_or(Error::MissingObjectKey("name"))?;
        let name = ft.name_any();
        let layout = RunLayout::new(&storage_prefix(&ft.spec.storage), &namespace, &name, &uid);
        Ok(Run {
            ft,
            name,
            namespace,
            uid,
            layout,
            owner,
        })
    }

    /// The last round the object's status records as completed (0: none).
    pub fn last_recorded_round(&self) -> u32 {
        self.ft
            .status
            .as_ref()
            .and_then(|p| p.history.last())
            .map(|h| h.round)
            .unwrap_or(0)
    }

    /// What the [`RunStore`](crate::protocol::observe::RunStore) needs to find the run.
    pub fn store_ref(&self) -> RunRef {
        RunRef {
            storage: self.ft.spec.storage.clone(),
            layout: self.layout.clone(),
            clients: self
                .ft
                .spec
                .clients
                .iter()
                .map(|c| c.name.clone())
                .collect(),
            rounds: self.ft.spec.rounds,
        }
    }
}
