//! `warren ctl`: users, vhosts, permissions, policies and models of a
//! running broker, through
//! its management API (as `rabbitmqctl` and `rabbitmqadmin` do for
//! RabbitMQ). Every change is made, checked and persisted by the broker;
//! this is only its command line.

use std::io::Read;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::{Value, json};

/// How long one request may take; a broker that does not answer in this
/// time is reported, not waited for.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The broker's HTTP address.
    #[arg(
        long,
        value_name = "URL",
        default_value = "http://localhost:15672",
        env = "WARREN_URL"
    )]
    url: String,

    /// An administrator's name.
    #[arg(long, default_value = "guest", env = "WARREN_USER")]
    user: String,

    /// Their password.
    #[arg(
        long,
        default_value = "guest",
        env = "WARREN_PASSWORD",
        hide_default_value = true
    )]
    password: String,

    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Debug, Subcommand)]
enum CtlCommand {
    /// Creates a user (or replaces one's password and tags).
    AddUser {
        name: String,
        /// The password; read from standard input when absent.
        password: Option<String>,
        /// Comma-separated: administrator, monitoring, management, ...
        #[arg(long, default_value = "")]
        tags: String,
    },
    /// Deletes a user and closes their connections.
    DeleteUser {
        name: String,
    },
    /// Sets a user's password (read from standard input when absent).
    ChangePassword {
        name: String,
        password: Option<String>,
    },
    /// Replaces a user's tags.
    SetUserTags {
        name: String,
        tags: Vec<String>,
    },
    ListUsers,
    AddVhost {
        name: String,
    },
    /// Deletes a vhost with its queues and messages, closing its
    /// connections.
    DeleteVhost {
        name: String,
    },
    ListVhosts,
    /// Sets a user's configure, write and read patterns in a vhost.
    SetPermissions {
        #[arg(short = 'p', long, default_value = "/")]
        vhost: String,
        user: String,
        configure: String,
        write: String,
        read: String,
    },
    ClearPermissions {
        #[arg(short = 'p', long, default_value = "/")]
        vhost: String,
        user: String,
    },
    /// Permissions in one vhost.
    ListPermissions {
        #[arg(short = 'p', long, default_value = "/")]
        vhost: String,
    },
    ListUserPermissions {
        user: String,
    },
    /// Sets a policy, as `rabbitmqctl set_policy` does: NAME applies to
    /// the queues and exchanges whose names match PATTERN (a regular
    /// expression), with the settings of DEFINITION (a JSON object such as
    /// '{"max-length":1000}').
    SetPolicy {
        #[command(flatten)]
        policy: PolicyArgs,
    },
    ClearPolicy {
        #[arg(short = 'p', long, default_value = "/")]
        vhost: String,
        name: String,
    },
    /// Policies of one vhost.
    ListPolicies {
        #[arg(short = 'p', long, default_value = "/")]
        vhost: String,
    },
    /// Sets an operator policy: limits that cap what users' policies and
    /// queue arguments set.
    SetOperatorPolicy {
        #[command(flatten)]
        policy: PolicyArgs,
    },
    ClearOperatorPolicy {
        #[arg(short = 'p', long, default_value = "/")]
        vhost: String,
        name: String,
    },
    ListOperatorPolicies {
        #[arg(short = 'p', long, default_value = "/")]
        vhost: String,
    },
    /// Prints the Argon2id hash of a password, for `password_hash` in the
    /// configuration file; talks to no broker.
    HashPassword {
        password: Option<String>,
    },
    /// Loads a model version from a TOML file holding one `[[model]]`
    /// entry (with its `name` and `version`; paths as the broker sees
    /// them), warms it up and switches the model's traffic to it.
    LoadModel {
        #[arg(value_name = "FILE.toml")]
        file: std::path::PathBuf,
    },
    /// Takes a model version out of traffic; it stops once its queue has
    /// drained.
    UnloadModel {
        name: String,
        version: String,
    },
    /// Model versions and their state.
    ListModels,
}

#[derive(Debug, Args)]
struct PolicyArgs {
    #[arg(short = 'p', long, default_value = "/")]
    vhost: String,
    /// Among the policies matching an object, the highest applies.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    priority: i64,
    /// queues, classic_queues, quorum_queues, exchanges or all.
    #[arg(long, default_value = "all")]
    apply_to: String,
    name: String,
    pattern: String,
    /// A JSON object of policy settings.
    definition: String,
}

impl PolicyArgs {
    fn path(&self, collection: &str) -> String {
        format!(
            "/api/{collection}/{}/{}",
            segment(&self.vhost),
            segment(&self.name)
        )
    }

    fn body(&self) -> anyhow::Result<Value> {
        let definition: Value = serde_json::from_str(&self.definition)
            .with_context(|| format!("the definition is not JSON: {}", self.definition))?;
        Ok(json!({
            "pattern": self.pattern,
            "definition": definition,
            "priority": self.priority,
            "apply-to": self.apply_to,
        }))
    }
}

/// The one `[[model]]` entry of a file, as JSON.
fn model_entry(file: &std::path::Path) -> anyhow::Result<Value> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
    let entry = match table.get("model") {
        Some(toml::Value::Array(entries)) if entries.len() == 1 => entries[0].clone(),
        _ => anyhow::bail!("{} must hold exactly one [[model]] entry", file.display()),
    };
    Ok(serde_json::to_value(entry)?)
}

/// `/` and other reserved characters in names go percent-encoded into
/// paths, as RabbitMQ's API expects (`%2F` for the default vhost).
fn segment(name: &str) -> String {
    let mut encoded = String::with_capacity(name.len());
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

struct Client {
    agent: ureq::Agent,
    base: String,
    authorization: String,
}

impl Client {
    fn new(args: &CtlArgs) -> Self {
        use base64::Engine;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(REQUEST_TIMEOUT))
            .http_status_as_error(false)
            .build()
            .into();
        let credentials = format!("{}:{}", args.user, args.password);
        Self {
            agent,
            base: args.url.trim_end_matches('/').to_owned(),
            authorization: format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(credentials)
            ),
        }
    }

    /// Sends a request; an error status becomes an error carrying the
    /// broker's reason.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let request = ureq::http::Request::builder()
            .method(method)
            .uri(&url)
            .header("authorization", &self.authorization)
            .header("content-type", "application/json");
        let body = body.map(|body| body.to_string()).unwrap_or_default();
        let request = request.body(body).context("building the request")?;
        let mut response = self
            .agent
            .run(request)
            .with_context(|| format!("{method} {url}"))?;
        let status = response.status();
        let text = response
            .body_mut()
            .read_to_string()
            .with_context(|| format!("reading the answer to {method} {url}"))?;
        let value: Value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if !status.is_success() {
            let reason = value
                .get("reason")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| value.to_string());
            anyhow::bail!("{method} {path}: {status}: {reason}");
        }
        Ok(value)
    }
}

fn password_or_stdin(password: Option<String>) -> anyhow::Result<String> {
    match password {
        Some(password) => Ok(password),
        None => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading the password from standard input")?;
            Ok(text.trim_end_matches(['\r', '\n']).to_owned())
        }
    }
}

fn print_rows(rows: &Value, columns: &[&str]) {
    println!("{}", columns.join("\t"));
    for row in rows.as_array().into_iter().flatten() {
        let cells: Vec<String> = columns
            .iter()
            .map(|column| match &row[*column] {
                Value::String(text) => text.clone(),
                Value::Array(items) => items
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(","),
                Value::Null => String::new(),
                other => other.to_string(),
            })
            .collect();
        println!("{}", cells.join("\t"));
    }
}

/// The columns `rabbitmqctl list_policies` prints.
const POLICY_COLUMNS: &[&str] = &[
    "vhost",
    "name",
    "pattern",
    "apply-to",
    "definition",
    "priority",
];

pub fn run(args: CtlArgs) -> anyhow::Result<()> {
    let client = Client::new(&args);
    match args.command {
        CtlCommand::AddUser {
            name,
            password,
            tags,
        } => {
            let password = password_or_stdin(password)?;
            client.call(
                "PUT",
                &format!("/api/users/{}", segment(&name)),
                Some(json!({"password": password, "tags": tags})),
            )?;
            println!("user '{name}' saved");
        }
        CtlCommand::DeleteUser { name } => {
            client.call("DELETE", &format!("/api/users/{}", segment(&name)), None)?;
            println!("user '{name}' deleted");
        }
        CtlCommand::ChangePassword { name, password } => {
            let password = password_or_stdin(password)?;
            client.call(
                "PUT",
                &format!("/api/users/{}", segment(&name)),
                Some(json!({"password": password})),
            )?;
            println!("password of '{name}' changed");
        }
        CtlCommand::SetUserTags { name, tags } => {
            client.call(
                "PUT",
                &format!("/api/users/{}", segment(&name)),
                Some(json!({"tags": tags})),
            )?;
            println!("tags of '{name}' set");
        }
        CtlCommand::ListUsers => {
            let users = client.call("GET", "/api/users", None)?;
            print_rows(&users, &["name", "tags"]);
        }
        CtlCommand::AddVhost { name } => {
            client.call("PUT", &format!("/api/vhosts/{}", segment(&name)), None)?;
            println!("vhost '{name}' added");
        }
        CtlCommand::DeleteVhost { name } => {
            client.call("DELETE", &format!("/api/vhosts/{}", segment(&name)), None)?;
            println!("vhost '{name}' deleted");
        }
        CtlCommand::ListVhosts => {
            let vhosts = client.call("GET", "/api/vhosts", None)?;
            print_rows(&vhosts, &["name", "messages"]);
        }
        CtlCommand::SetPermissions {
            vhost,
            user,
            configure,
            write,
            read,
        } => {
            client.call(
                "PUT",
                &format!("/api/permissions/{}/{}", segment(&vhost), segment(&user)),
                Some(json!({"configure": configure, "write": write, "read": read})),
            )?;
            println!("permissions of '{user}' in '{vhost}' set");
        }
        CtlCommand::ClearPermissions { vhost, user } => {
            client.call(
                "DELETE",
                &format!("/api/permissions/{}/{}", segment(&vhost), segment(&user)),
                None,
            )?;
            println!("permissions of '{user}' in '{vhost}' cleared");
        }
        CtlCommand::ListPermissions { vhost } => {
            let rows = client.call(
                "GET",
                &format!("/api/vhosts/{}/permissions", segment(&vhost)),
                None,
            )?;
            print_rows(&rows, &["user", "configure", "write", "read"]);
        }
        CtlCommand::ListUserPermissions { user } => {
            let rows = client.call(
                "GET",
                &format!("/api/users/{}/permissions", segment(&user)),
                None,
            )?;
            print_rows(&rows, &["vhost", "configure", "write", "read"]);
        }
        CtlCommand::LoadModel { file } => {
            let entry = model_entry(&file)?;
            let name = entry
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let version = entry.get("version").and_then(Value::as_str).unwrap_or("1");
            let path = format!(
                "/api/models/{}/versions/{}",
                segment(name),
                segment(version)
            );
            let loaded = client.call("PUT", &path, Some(entry.clone()))?;
            println!(
                "model '{name}' version '{version}' {} on queue '{}'",
                loaded["state"].as_str().unwrap_or("loaded"),
                loaded["queue"].as_str().unwrap_or_default()
            );
        }
        CtlCommand::UnloadModel { name, version } => {
            client.call(
                "DELETE",
                &format!(
                    "/api/models/{}/versions/{}",
                    segment(&name),
                    segment(&version)
                ),
                None,
            )?;
            println!(
                "model '{name}' version '{version}' draining; it stops once its queue is empty"
            );
        }
        CtlCommand::ListModels => {
            let models = client.call("GET", "/api/models", None)?;
            print_rows(&models, &["name", "version", "state", "queue", "messages"]);
        }
        CtlCommand::SetPolicy { policy } => {
            client.call("PUT", &policy.path("policies"), Some(policy.body()?))?;
            println!("policy '{}' set in '{}'", policy.name, policy.vhost);
        }
        CtlCommand::SetOperatorPolicy { policy } => {
            client.call(
                "PUT",
                &policy.path("operator-policies"),
                Some(policy.body()?),
            )?;
            println!(
                "operator policy '{}' set in '{}'",
                policy.name, policy.vhost
            );
        }
        CtlCommand::ClearPolicy { vhost, name } => {
            let path = format!("/api/policies/{}/{}", segment(&vhost), segment(&name));
            client.call("DELETE", &path, None)?;
            println!("policy '{name}' cleared in '{vhost}'");
        }
        CtlCommand::ClearOperatorPolicy { vhost, name } => {
            let path = format!(
                "/api/operator-policies/{}/{}",
                segment(&vhost),
                segment(&name)
            );
            client.call("DELETE", &path, None)?;
            println!("operator policy '{name}' cleared in '{vhost}'");
        }
        CtlCommand::ListPolicies { vhost } => {
            let rows = client.call("GET", &format!("/api/policies/{}", segment(&vhost)), None)?;
            print_rows(&rows, POLICY_COLUMNS);
        }
        CtlCommand::ListOperatorPolicies { vhost } => {
            let path = format!("/api/operator-policies/{}", segment(&vhost));
            let rows = client.call("GET", &path, None)?;
            print_rows(&rows, POLICY_COLUMNS);
        }
        CtlCommand::HashPassword { password } => {
            let password = password_or_stdin(password)?;
            let hash = warren_access::PasswordHash::generate(&password)?;
            println!("{}", hash.as_str());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::segment;

    #[test]
    fn names_are_percent_encoded_in_paths() {
        assert_eq!(segment("/"), "%2F");
        assert_eq!(segment("ml-prod_1.x"), "ml-prod_1.x");
        assert_eq!(segment("a b/c"), "a%20b%2Fc");
    }
}
