// The broker connection from the environment, and the schema files.
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Properties;
import org.apache.avro.Schema;

/** The broker connection from the environment, and the schema files. */
class Connection {
    static String env(String name, String otherwise) {
        String value = System.getenv(name);
        return value == null || value.isEmpty() ? otherwise : value;
    }

    static Schema schema(String topic, int version) throws Exception {
        Path dir = Path.of(env("MAILBUS_SCHEMAS", "../../schemas"));
        return new Schema.Parser().parse(dir.resolve(topic).resolve("v" + version + ".avsc").toFile());
    }

    static Properties properties() throws Exception {
        String password = System.getenv("MAILBUS_PASSWORD");
        String file = System.getenv("MAILBUS_PASSWORD_FILE");
        if (file != null && !file.isEmpty()) {
            password = Files.readString(Path.of(file)).strip();
        }
        String protocol = env("MAILBUS_SECURITY_PROTOCOL", "SASL_PLAINTEXT");
        if (!protocol.equals("SASL_PLAINTEXT") && !protocol.equals("SASL_SSL")) {
            throw new IllegalArgumentException("MAILBUS_SECURITY_PROTOCOL " + protocol);
        }
        Properties props = new Properties();
        props.put("bootstrap.servers", env("MAILBUS_BOOTSTRAP", "127.0.0.1:9092"));
        props.put("security.protocol", protocol);
        props.put("sasl.mechanism", "SCRAM-SHA-512");
        props.put("sasl.jaas.config", String.format(
            "org.apache.kafka.common.security.scram.ScramLoginModule required username=\"%s\" password=\"%s\";",
            System.getenv("MAILBUS_USERNAME"), password));
        if (System.getenv("MAILBUS_CA_FILE") != null) {
            props.put("ssl.truststore.type", "PEM");
            props.put("ssl.truststore.location", System.getenv("MAILBUS_CA_FILE"));
        }
        return props;
    }
}
