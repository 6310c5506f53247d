import ArgumentParser

/// Subcommands whose implementation has not landed yet say so plainly and exit 2.
enum NotAvailable {
    static func fail(_ command: String) -> ExitCode {
        Output.err("keyhole \(command): not available yet in this build (\(Keyhole.version)); see README.md for what works today")
        return ExitCode(2)
    }
}

struct ProxyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "proxy",
        abstract: "Run the appliance in front of a guest-facing interface. (Not available yet.)")

    @Option(help: "Policy file.") var policy: String
    @Option(help: "Guest-facing interface (TAP or bridge).") var interface: String

    func run() throws { throw NotAvailable.fail("proxy") }
}

struct RunCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Boot a guest behind Keyhole from a policy file. (Not available yet.)")

    @Argument(help: "Policy file.") var file: String
    @Argument(parsing: .postTerminator, help: "Command to run in the guest.") var command: [String] = []

    func run() throws { throw NotAvailable.fail("run") }
}
