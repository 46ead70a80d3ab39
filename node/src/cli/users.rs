//! `alliance user …`: the lab admin gives researchers their API tokens.

use anyhow::Result;
use clap::Subcommand;
use serde_json::json;

use super::researcher::Dir;

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Make a user of this node's API and print their token, once.
    Add {
        name: String,
        /// May see every job, pause the worker, apply revocations and
        /// manage users.
        #[arg(long)]
        admin: bool,
        #[command(flatten)]
        dir: Dir,
    },
    /// The API's users.
    List(Dir),
    /// Take a user's token away (their jobs stay).
    Revoke {
        name: String,
        #[command(flatten)]
        dir: Dir,
    },
}

/// Runs `alliance user …`.
pub fn user(cmd: UserCommand, json: bool) -> Result<()> {
    match cmd {
        UserCommand::Add { name, admin, dir } => {
            let api = dir.api()?;
            let body = json!({ "name": name, "admin": admin }).to_string();
            let v = api.send("POST", "/v1/users", &body)?;
            if json {
                println!("{v}");
            } else {
                let token = v["token"].as_str().unwrap_or("?");
                println!(
                    "user {name}{} made; their token (shown only now):\n\n  {token}\n",
                    if admin { " (admin)" } else { "" }
                );
                println!(
                    "They use it as:\n  export ALLIANCE_URL={} ALLIANCE_TOKEN={token}\n  alliance submit job.toml --wait",
                    api.url()
                );
            }
        }
        UserCommand::List(dir) => {
            let v = dir.api()?.get("/v1/users")?;
            if json {
                println!("{v}");
            } else {
                println!("{:<24} {:<6} created", "name", "admin");
                for u in v.as_array().into_iter().flatten() {
                    let created = u["created_at"].as_u64().unwrap_or(0);
                    println!(
                        "{:<24} {:<6} {}",
                        u["name"].as_str().unwrap_or("?"),
                        u["admin"],
                        if created == 0 {
                            "(the node's own)".to_owned()
                        } else {
                            jiff::Timestamp::from_second(i64::try_from(created).unwrap_or(0))
                                .map_or(created.to_string(), |t| t.to_string())
                        }
                    );
                }
            }
        }
        UserCommand::Revoke { name, dir } => {
            let v = dir
                .api()?
                .send("DELETE", &format!("/v1/users/{name}"), "")?;
            if json {
                println!("{v}");
            } else {
                println!("user {name}: token revoked");
            }
        }
    }
    Ok(())
}
