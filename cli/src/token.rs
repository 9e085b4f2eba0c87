//! `drover token …`: API tokens for the runner's HTTP API (`docs/web.md`), managed with an
//! admin's certificate: create one (its secret printed once, alone on standard output, so
//! `TOKEN=$(drover token create …)` keeps it), revoke one by name, list them (never their
//! secrets).

use clap::{Args, Subcommand};
use drover_proto::v1::{ApiToken, CreateTokenRequest, ListTokensRequest, RevokeTokenRequest};
use error_context::WithContext;

use crate::admin::{AdminError, ListArgs, call, client, print};
use crate::connection::ConnectionArgs;
use crate::times;

/// The token subcommands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token and print its secret, once: the runner keeps only a hash of it.
    Create(CreateArgs),
    /// Revoke a token by name: every request with it is refused from now on.
    Revoke(NameArgs),
    /// List the tokens: name, role, who created it, last use, revocation.
    List(ListArgs),
}

/// `drover token create` arguments.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Who or what uses it (a user, a dashboard); its requests act as ROLE/NAME.
    #[arg(long)]
    name: String,
    /// client (the build API) or admin.
    #[arg(long, default_value = "client")]
    role: String,
    /// Where the runner is.
    #[command(flatten)]
    connection: ConnectionArgs,
}

/// Arguments naming one token.
#[derive(Debug, Args)]
pub struct NameArgs {
    /// The token's name.
    name: String,
    /// Where the runner is.
    #[command(flatten)]
    connection: ConnectionArgs,
}

/// Runs `drover token …`.
pub async fn run(command: TokenCommand) -> Result<(), WithContext<AdminError>> {
    match command {
        TokenCommand::Create(args) => {
            let token = client(&args.connection)
                .await?
                .create_token(CreateTokenRequest {
                    name: args.name.clone(),
                    role: args.role.clone(),
                })
                .await
                .map_err(call)?
                .into_inner()
                .token;
            eprintln!(
                "token {} (role {}) created; this is the only time its secret is shown:",
                args.name, args.role
            );
            print(&token)?;
        }
        TokenCommand::Revoke(args) => {
            client(&args.connection)
                .await?
                .revoke_token(RevokeTokenRequest {
                    name: args.name.clone(),
                })
                .await
                .map_err(call)?;
            eprintln!("token {} revoked", args.name);
        }
        TokenCommand::List(args) => {
            let tokens = client(&args.connection)
                .await?
                .list_tokens(ListTokensRequest {})
                .await
                .map_err(call)?
                .into_inner()
                .tokens;
            let text = if args.json {
                serde_json::Value::Array(tokens.iter().map(token_json).collect()).to_string()
            } else {
                token_table(&tokens)
            };
            print(&text)?;
        }
    }
    Ok(())
}

/// Two lines a token: its identity, then when it was created, used and revoked.
fn token_table(tokens: &[ApiToken]) -> String {
    let mut lines = Vec::new();
    for token in tokens {
        lines.push(format!("{}/{}", token.role, token.name));
        let used = if token.last_used_at_ms == 0 {
            "never used".to_owned()
        } else {
            format!("last used {}", times::instant(token.last_used_at_ms))
        };
        let revoked = if token.revoked_at_ms == 0 {
            String::new()
        } else {
            format!(
                "; REVOKED {} by {}",
                times::instant(token.revoked_at_ms),
                token.revoked_by
            )
        };
        lines.push(format!(
            "  created {} by {}; {used}{revoked}",
            times::instant(token.created_at_ms),
            token.created_by
        ));
    }
    lines.join("\n")
}

/// A token as `--json` prints it: the API's fields.
fn token_json(token: &ApiToken) -> serde_json::Value {
    serde_json::json!({
        "name": token.name,
        "role": token.role,
        "created_at_ms": token.created_at_ms,
        "created_by": token.created_by,
        "last_used_at_ms": token.last_used_at_ms,
        "revoked_at_ms": token.revoked_at_ms,
        "revoked_by": token.revoked_by,
    })
}
