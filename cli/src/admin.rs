//! `drover admin …`: the operator's commands (a certificate with role admin): list the builders,
//! drain and enable one, quarantine one or lift its quarantine, set a build's global priority
//! and the admission cap, list the certificates the runner has seen and revoke one. Each change is committed when the
//! command returns, and survives a restart of the runner.

use std::io::Write as _;

use clap::{Args, Subcommand};
use drover_proto::v1::admin_service_client::AdminServiceClient;
use drover_proto::v1::{
    Certificate, ListCertificatesRequest, ListMachinesRequest, Machine, MachineRequest,
    PinBuildRequest, RevokeCertificateRequest, SetAdmissionCapRequest, SetGlobalPriorityRequest,
};
use error_context::{Classify, Severity, WithContext};
use tonic::transport::Channel;

use crate::call::CallError;
use crate::connection::{ConnectError, ConnectionArgs};
use crate::exit::{Exit, ExitStatus};
use crate::inspect::derivation_name;
use crate::times;

/// The admin subcommands.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// List the builders: state, load, last ping, free disk, memory pressure, and why one takes
    /// no work.
    Machines(ListArgs),
    /// Drain a builder: it finishes what it runs and gets no new work until enabled.
    Drain(MachineArgs),
    /// Enable a drained builder.
    Enable(MachineArgs),
    /// Quarantine a builder: no work for the cool-down, then one probation step.
    Quarantine(MachineArgs),
    /// Lift a builder's quarantine at once.
    Lift(MachineArgs),
    /// Set a queued or running build's global priority (higher goes first; default 0).
    Priority(PriorityArgs),
    /// Set the admission cap: Submits that would queue more steps than this are refused.
    Cap(CapArgs),
    /// Pin a build: its outputs and their closure stay in the binary cache whatever its age.
    Pin(BuildArgs),
    /// Unpin a build: its outputs go when garbage collection's other rules let them.
    Unpin(BuildArgs),
    /// List the client certificates the runner has seen, and which are revoked.
    Certs(ListArgs),
    /// Revoke a certificate by serial: its calls are refused, a builder's tunnel ends at once.
    Revoke(RevokeArgs),
}

/// `drover admin cap` arguments.
#[derive(Debug, Args)]
pub struct CapArgs {
    /// The most steps waiting or runnable a Submit may bring the queue to.
    max_queued_steps: u32,
    /// Where the runner is.
    #[command(flatten)]
    connection: ConnectionArgs,
}

/// `drover admin revoke` arguments.
#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The certificate's serial number (hex, as `drover admin certs` or `openssl x509 -noout
    /// -serial` shows it).
    serial: String,
    /// Where the runner is.
    #[command(flatten)]
    connection: ConnectionArgs,
}

/// Arguments of a listing (`machines`, `certs`).
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print JSON (one array) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Where the runner is.
    #[command(flatten)]
    pub connection: ConnectionArgs,
}

/// Arguments naming one builder.
#[derive(Debug, Args)]
pub struct MachineArgs {
    /// The builder's name (from its certificate).
    name: String,
    /// Where the runner is.
    #[command(flatten)]
    connection: ConnectionArgs,
}

/// Arguments naming one build.
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The build's id.
    build: i64,
    /// Where the runner is.
    #[command(flatten)]
    connection: ConnectionArgs,
}

/// `drover admin priority` arguments.
#[derive(Debug, Args)]
pub struct PriorityArgs {
    /// The build's id.
    build: i64,
    /// Its new global priority.
    #[arg(allow_negative_numbers = true)]
    priority: i32,
    /// Where the runner is.
    #[command(flatten)]
    connection: ConnectionArgs,
}

/// Why an admin command failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The runner cannot be reached.
    #[error("reaching the runner")]
    Connect(#[from] ConnectError),
    /// The call failed.
    #[error(transparent)]
    Call(#[from] CallError),
    /// The certificate is not an admin's.
    #[error(
        "this command needs a certificate with role admin (drover certs issue --dir DIR --role \
         admin --name NAME, then DROVER_CERT and DROVER_KEY)"
    )]
    NotAdmin(#[source] CallError),
    /// Standard output is closed.
    #[error("writing to standard output")]
    Output(#[source] std::io::Error),
}

impl ExitStatus for AdminError {
    fn exit(&self) -> Exit {
        match self {
            Self::Connect(error) => error.exit(),
            Self::Call(error) | Self::NotAdmin(error) => error.exit(),
            Self::Output(_) => Exit::Failed,
        }
    }
}

impl Classify for AdminError {
    fn severity(&self) -> Severity {
        match self {
            Self::Connect(error) => error.severity(),
            Self::Call(error) | Self::NotAdmin(error) => error.severity(),
            Self::Output(_) => Severity::Fatal,
        }
    }
}

/// Runs `drover admin …`.
pub async fn run(command: AdminCommand) -> Result<(), WithContext<AdminError>> {
    match command {
        AdminCommand::Machines(args) => machines(args).await,
        AdminCommand::Drain(args) => {
            steer(args, "drained", |mut client, request| async move {
                client.drain_machine(request).await
            })
            .await
        }
        AdminCommand::Enable(args) => {
            steer(args, "enabled", |mut client, request| async move {
                client.enable_machine(request).await
            })
            .await
        }
        AdminCommand::Quarantine(args) => {
            steer(args, "quarantined", |mut client, request| async move {
                client.quarantine_machine(request).await
            })
            .await
        }
        AdminCommand::Lift(args) => {
            steer(
                args,
                "out of quarantine",
                |mut client, request| async move { client.lift_quarantine(request).await },
            )
            .await
        }
        AdminCommand::Priority(args) => priority(args).await,
        AdminCommand::Cap(args) => cap(args).await,
        AdminCommand::Pin(args) => pin(args, true).await,
        AdminCommand::Unpin(args) => pin(args, false).await,
        AdminCommand::Certs(args) => certs(args).await,
        AdminCommand::Revoke(args) => revoke(args).await,
    }
}

/// The admin service of the runner `connection` names.
pub async fn client(
    connection: &ConnectionArgs,
) -> Result<AdminServiceClient<Channel>, AdminError> {
    Ok(AdminServiceClient::new(connection.connect().await?))
}

/// A failed call, saying so when the certificate is not an admin's.
pub fn call(status: tonic::Status) -> AdminError {
    if status.code() == tonic::Code::PermissionDenied {
        AdminError::NotAdmin(CallError::from(status))
    } else {
        AdminError::Call(CallError::from(status))
    }
}

async fn machines(args: ListArgs) -> Result<(), WithContext<AdminError>> {
    let machines = client(&args.connection)
        .await?
        .list_machines(ListMachinesRequest {})
        .await
        .map_err(call)?
        .into_inner()
        .machines;
    let text = if args.json {
        let machines: Vec<_> = machines.iter().map(machine_json).collect();
        serde_json::Value::Array(machines).to_string()
    } else {
        machine_table(&machines, times::now_ms())
    };
    print(&text)?;
    Ok(())
}

/// Writes `text` and a newline to standard output.
pub fn print(text: &str) -> Result<(), AdminError> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{text}").map_err(AdminError::Output)
}

async fn cap(args: CapArgs) -> Result<(), WithContext<AdminError>> {
    let answer = client(&args.connection)
        .await?
        .set_admission_cap(SetAdmissionCapRequest {
            max_queued_steps: args.max_queued_steps,
        })
        .await
        .map_err(call)?
        .into_inner();
    eprintln!(
        "admission cap {} steps (was {}); {} steps are queued now",
        args.max_queued_steps, answer.previous, answer.queued_steps
    );
    Ok(())
}

async fn certs(args: ListArgs) -> Result<(), WithContext<AdminError>> {
    let certificates = client(&args.connection)
        .await?
        .list_certificates(ListCertificatesRequest {})
        .await
        .map_err(call)?
        .into_inner()
        .certificates;
    let text = if args.json {
        let certificates: Vec<_> = certificates.iter().map(certificate_json).collect();
        serde_json::Value::Array(certificates).to_string()
    } else {
        certificate_table(&certificates)
    };
    print(&text)?;
    Ok(())
}

async fn revoke(args: RevokeArgs) -> Result<(), WithContext<AdminError>> {
    let answer = client(&args.connection)
        .await?
        .revoke_certificate(RevokeCertificateRequest {
            serial: args.serial.clone(),
        })
        .await
        .map_err(call)?
        .into_inner();
    if answer.identity.is_empty() {
        eprintln!(
            "certificate {} revoked (the runner has not seen it yet)",
            args.serial
        );
    } else {
        eprintln!("certificate {} of {} revoked", args.serial, answer.identity);
    }
    Ok(())
}

async fn steer<F, Fut>(
    args: MachineArgs,
    done: &str,
    send: F,
) -> Result<(), WithContext<AdminError>>
where
    F: FnOnce(AdminServiceClient<Channel>, MachineRequest) -> Fut,
    Fut: Future<Output = Result<tonic::Response<drover_proto::v1::MachineResponse>, tonic::Status>>,
{
    let client = client(&args.connection).await?;
    let machine = send(client, MachineRequest { name: args.name })
        .await
        .map_err(call)?
        .into_inner()
        .machine
        .unwrap_or_default();
    eprintln!("{} {done}: now {}", machine.name, machine.state);
    Ok(())
}

async fn pin(args: BuildArgs, pinned: bool) -> Result<(), WithContext<AdminError>> {
    client(&args.connection)
        .await?
        .pin_build(PinBuildRequest {
            build_id: args.build,
            pinned,
        })
        .await
        .map_err(call)?;
    let done = if pinned { "pinned" } else { "unpinned" };
    eprintln!("build {} {done}", args.build);
    Ok(())
}

async fn priority(args: PriorityArgs) -> Result<(), WithContext<AdminError>> {
    client(&args.connection)
        .await?
        .set_global_priority(SetGlobalPriorityRequest {
            build_id: args.build,
            global_priority: args.priority,
        })
        .await
        .map_err(call)?;
    eprintln!("build {} has global priority {}", args.build, args.priority);
    Ok(())
}

/// The builders as a table, one line each, then a line for each builder that takes no work
/// (why) or runs steps (which).
fn machine_table(machines: &[Machine], now_ms: i64) -> String {
    let width = machines
        .iter()
        .map(|machine| machine.name.len())
        .max()
        .unwrap_or(0)
        .max("NAME".len());
    let row = |name: &str, state: &str, jobs: &str, ping: &str, disk: &str, memory: &str| {
        format!("{name:width$}  {state:15}  {jobs:>5}  {ping:>9}  {disk:>10}  {memory:>7}")
    };
    let mut lines = vec![row(
        "NAME",
        "STATE",
        "JOBS",
        "LAST PING",
        "FREE DISK",
        "MEM PSI",
    )];
    for machine in machines {
        let ping = if machine.last_ping_at_ms == 0 {
            "-".to_owned()
        } else {
            let ago = now_ms.saturating_sub(machine.last_ping_at_ms).max(0);
            format!("{} ago", times::duration(ago))
        };
        lines.push(row(
            &machine.name,
            &machine.state,
            &format!("{}/{}", machine.running_steps.len(), machine.max_jobs),
            &ping,
            &machine.free_disk_bytes.map_or("-".to_owned(), bytes),
            &machine
                .memory_pressure_percent
                .map_or("-".to_owned(), |percent| format!("{percent:.1}%")),
        ));
        if machine.drained_at_ms != 0 {
            let since = times::instant(machine.drained_at_ms);
            lines.push(format!("  drained since {since}"));
        }
        if !machine.quarantine_reason.is_empty() {
            lines.push(format!(
                "  quarantined since {}: {}",
                times::instant(machine.quarantined_at_ms),
                machine.quarantine_reason
            ));
            let from = times::instant(machine.probation_from_ms);
            lines.push(format!("  probation from {from}"));
        }
        for step in &machine.running_steps {
            let name = derivation_name(step).unwrap_or(step);
            lines.push(format!("  building {name}"));
        }
    }
    lines.join("\n")
}

/// The certificates, two lines each (a serial is 40 hex digits): the serial and the identity
/// it names, then when it was seen and whether it is revoked.
fn certificate_table(certificates: &[Certificate]) -> String {
    let mut lines = Vec::new();
    for certificate in certificates {
        let identity = if certificate.role.is_empty() {
            "(never seen)".to_owned()
        } else {
            format!("{}/{}", certificate.role, certificate.name)
        };
        lines.push(format!("{}  {identity}", certificate.serial));
        let seen = if certificate.role.is_empty() {
            "  never seen".to_owned()
        } else {
            format!(
                "  seen {} to {}",
                times::instant(certificate.first_seen_at_ms),
                times::instant(certificate.last_seen_at_ms)
            )
        };
        let revoked = if certificate.revoked_at_ms == 0 {
            String::new()
        } else {
            format!(
                "; REVOKED {} by {}",
                times::instant(certificate.revoked_at_ms),
                certificate.revoked_by
            )
        };
        lines.push(format!("{seen}{revoked}"));
    }
    lines.join("\n")
}

/// A certificate as `--json` prints it: the API's fields.
fn certificate_json(certificate: &Certificate) -> serde_json::Value {
    serde_json::json!({
        "serial": certificate.serial,
        "role": certificate.role,
        "name": certificate.name,
        "first_seen_at_ms": certificate.first_seen_at_ms,
        "last_seen_at_ms": certificate.last_seen_at_ms,
        "revoked_at_ms": certificate.revoked_at_ms,
        "revoked_by": certificate.revoked_by,
    })
}

/// Bytes in binary units, one decimal: `10.2 GiB`.
fn bytes(count: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = count;
    let mut tenths = 0;
    let mut unit = 0;
    while value >= 1024 && unit + 1 < UNITS.len() {
        tenths = (value % 1024) * 10 / 1024;
        value /= 1024;
        unit += 1;
    }
    if unit == 0 {
        format!("{value} B")
    } else {
        format!("{value}.{tenths} {}", UNITS[unit])
    }
}

/// A builder as `--json` prints it: the API's fields, times in Unix milliseconds (absent: 0).
fn machine_json(machine: &Machine) -> serde_json::Value {
    serde_json::json!({
        "name": machine.name,
        "state": machine.state,
        "systems": machine.systems,
        "max_jobs": machine.max_jobs,
        "running_steps": machine.running_steps,
        "last_ping_at_ms": machine.last_ping_at_ms,
        "free_disk_bytes": machine.free_disk_bytes,
        "memory_pressure_percent": machine.memory_pressure_percent,
        "drained_at_ms": machine.drained_at_ms,
        "quarantine_reason": machine.quarantine_reason,
        "quarantined_at_ms": machine.quarantined_at_ms,
        "probation_from_ms": machine.probation_from_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_read_in_binary_units() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(
            bytes(10 * 1024 * 1024 * 1024 + 200 * 1024 * 1024),
            "10.1 GiB"
        );
    }

    #[test]
    fn the_table_fits_80_columns_with_a_20_character_name_and_says_why_a_builder_is_idle() {
        let now = 1_764_750_665_000;
        let machines = [
            Machine {
                name: "builder-long-name-01".to_owned(),
                state: "memory_pressure".to_owned(),
                memory_pressure_percent: Some(72.5),
                max_jobs: 4,
                last_ping_at_ms: now - 3_000,
                free_disk_bytes: Some(12 * 1024 * 1024 * 1024),
                quarantine_reason: "3 infrastructure failures in a row".to_owned(),
                quarantined_at_ms: now - 60_000,
                probation_from_ms: now + 540_000,
                ..Machine::default()
            },
            Machine {
                name: "b2".to_owned(),
                state: "busy".to_owned(),
                max_jobs: 2,
                running_steps: vec![
                    "/nix/store/00000000000000000000000000000000-hello-2.12.drv".to_owned(),
                ],
                ..Machine::default()
            },
        ];
        let table = machine_table(&machines, now);
        let header = table.lines().next().unwrap_or_default();
        assert!(header.len() <= 80, "{header}");
        assert!(
            table.lines().nth(1).is_some_and(|line| line.len() <= 80),
            "{table}"
        );
        assert!(table.contains("3.0s ago"), "{table}");
        assert!(table.contains("12.0 GiB"), "{table}");
        assert!(table.contains("72.5%"), "{table}");
        assert!(
            table.contains("3 infrastructure failures in a row"),
            "{table}"
        );
        assert!(table.ends_with("\n  building hello-2.12"), "{table}");
        assert!(table.contains("1/2"), "{table}");
    }
}
