import ArgumentParser

@main
struct Keyhole: AsyncParsableCommand {
    static let version = "0.1.0"

    static let configuration = CommandConfiguration(
        commandName: "keyhole",
        abstract: "Transparent egress credential proxy: guests hold placeholders, Keyhole swaps in real values only for verified, allowed hosts.",
        version: version,
        subcommands: [
            PolicyCommand.self, CACommand.self, RewriteCommand.self, ProxyCommand.self, RunCommand.self,
        ]
    )
}

/// Options shared by commands that use the state directory.
struct StateOptions: ParsableArguments {
    @Option(
        name: .customLong("state-dir"),
        help: ArgumentHelp("Directory holding the sandbox CA and state (env: KEYHOLE_STATE_DIR).", valueName: "dir"))
    var stateDirectory: String?

    var resolved: String {
        if let stateDirectory { return stateDirectory }
        if let fromEnv = ProcessEnvironmentValue.get("KEYHOLE_STATE_DIR"), !fromEnv.isEmpty { return fromEnv }
        return "/var/lib/keyhole"
    }
}
