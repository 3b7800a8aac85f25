//! A small client for the daemon's Unix socket, used by the `keyseal` CLI,
//! the load generator and tests.

use std::path::Path;

use tonic::transport::{Channel, Endpoint};

use crate::api::pb::audit_client::AuditClient;
use crate::api::pb::{
    keys_client::KeysClient, secrets_client::SecretsClient, system_client::SystemClient,
};
use crate::daemon::CLIENT_MAX_MESSAGE_BYTES as MAX_MESSAGE_BYTES;

/// Env var naming the socket for the CLI.
pub const SOCKET_ENV: &str = "KEYSEAL_SOCKET";

/// Connects to the daemon at `socket`.
pub async fn connect(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    let ep = Endpoint::from_shared(format!("unix://{}", socket.display()))?
        .connect_timeout(std::time::Duration::from_secs(5));
    ep.connect().await
}

/// Clients of both services over one channel.
#[derive(Clone)]
pub struct Client {
    pub secrets: SecretsClient<Channel>,
    pub system: SystemClient<Channel>,
    pub keys: KeysClient<Channel>,
    pub audit: AuditClient<Channel>,
}

impl Client {
    pub async fn connect(socket: &Path) -> Result<Client, tonic::transport::Error> {
        let ch = connect(socket).await?;
        Ok(Client {
            secrets: SecretsClient::new(ch.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            system: SystemClient::new(ch.clone()),
            audit: AuditClient::new(ch.clone()),
            keys: KeysClient::new(ch),
        })
    }
}
